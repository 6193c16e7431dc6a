//! The `aec` command. All argument parsing, file reading, printing and exit codes live in
//! `cli/`; the compiler itself is the `aec` library.

#![deny(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
