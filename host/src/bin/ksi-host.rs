//! The KSI daemon and its administration commands.

fn main() {
    // Everything KSI writes is private (prompts, answers, the token), whatever the umask.
    ksi_host::store::private_umask();
    // A child that compiles one plugin for the daemon (see plugins::loader): no CLI, no config.
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == ksi_host::plugins::loader::COMPILE_WORKER_ARG {
        std::process::exit(ksi_host::plugins::loader::compile_worker_main(&args[2]));
    }
    std::process::exit(ksi_host::cli::host::main());
}
