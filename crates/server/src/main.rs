fn main() {
    eprintln!("peregrine: server not built yet");
    std::process::exit(1);
}
