use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    ft::backend::install_out_of_memory_hook();
    let cli = ft::cli::Cli::parse();
    match ft::cli::run(cli) {
        Ok(()) => ExitCode::from(ft::cli::exit::OK),
        Err(e) => {
            // A failed GPU allocation reported as an error rather than a panic reads the same.
            match ft::backend::out_of_memory_message(&format!("{e:#}"), ft::backend::gpu_memory()) {
                Some(m) => eprintln!("error: {m}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(ft::cli::exit_code(&e))
        }
    }
}
