//! `mayfly-zygote`: the sandbox backend's template process, spawned by `dom0-agent serve`
//! (see the `mayfly-zygote` library). Not run by hand.

fn main() -> std::process::ExitCode {
    mayfly_zygote::run()
}
