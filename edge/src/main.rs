//! The `burrow-edge` binary; everything lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    burrow_edge::cli::main()
}
