#![forbid(unsafe_code)]

fn main() {
    std::process::exit(neops_remote_lab::server::main(std::env::args_os().skip(1)));
}
