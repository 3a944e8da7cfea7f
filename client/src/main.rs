//! The `burrow` binary (`burrow connect`); everything lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    burrow_client::connect::main()
}
