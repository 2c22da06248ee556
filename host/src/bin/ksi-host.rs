//! The KSI daemon and its administration commands.

fn main() {
    std::process::exit(ksi_host::cli::host::main());
}
