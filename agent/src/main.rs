//! The `burrow-agent` binary; everything lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    burrow_agent::cli::main()
}
