use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ft::cli::Cli::parse();
    match ft::cli::run(cli) {
        Ok(()) => ExitCode::from(ft::cli::exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(ft::cli::exit_code(&e))
        }
    }
}
