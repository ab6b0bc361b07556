use clap::Parser;
use peregrine_server::cli::{compile_kernels, init_logging, serve, vllm_spellings, Cli, Command, LogFormat};

fn main() {
    let cli = Cli::parse_from(vllm_spellings(std::env::args_os()));
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::CompileKernels(args) => {
            init_logging(LogFormat::Text);
            if let Err(e) = compile_kernels(&args) {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            return;
        }
    };
    init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(serve(args)) {
        tracing::error!("{e:#}");
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    // Not waiting for blocking work still running (a model load a signal interrupted).
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
}
