//! The KSI daemon and its administration commands.

fn main() {
    // Everything KSI writes is private (prompts, answers, the token), whatever the umask.
    ksi_host::store::private_umask();
    std::process::exit(ksi_host::cli::host::main());
}
