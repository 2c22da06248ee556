//! A wasi:cli command, not a KSI step handler: the host must refuse it.
fn main() {
    println!("I am a command, not a step handler");
}
