//! `ksi-host bench plugins`: instantiation, call, load and reload timings.
