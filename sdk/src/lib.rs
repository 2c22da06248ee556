//! ksi-sdk: write KSI workflow steps as WebAssembly components.
