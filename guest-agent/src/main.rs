use microagent_agent::{console, init, reaper, session, vsock};
use microagent_agent_protocol::AGENT_PORT;

fn main() {
    let pid1 = std::process::id() == 1;
    let root = if pid1 {
        match init::setup() {
            Ok(root) => root,
            Err(e) => {
                console(&format!("cannot start the workspace: {e}"));
                init::power_off();
            }
        }
    } else {
        // Outside a VM (debugging): commands run in the current root.
        init::Root::host()
    };
    let reaper = reaper::Reaper::start();
    let listener = match vsock::Listener::bind(AGENT_PORT) {
        Ok(listener) => listener,
        Err(e) => {
            console(&format!("cannot listen on vsock port {AGENT_PORT}: {e}"));
            if pid1 {
                init::power_off();
            }
            std::process::exit(1);
        }
    };
    // Time since the kernel started its clock, for boot-time measurements
    // (integration/examples/bench_kernel_boot.rs reads this line).
    console(&format!(
        "ready on vsock port {AGENT_PORT} {:.3} s after kernel start",
        init::since_kernel_start().as_secs_f64()
    ));
    loop {
        match listener.accept() {
            Ok(stream) => {
                let reaper = reaper.clone();
                let root = root.clone();
                // Out of threads: drop this connection (the host sees it close), never
                // panic PID 1.
                if let Err(e) = std::thread::Builder::new()
                    .spawn(move || session::serve(stream, &root, &reaper))
                {
                    console(&format!("a session thread: {e}"));
                }
            }
            Err(e) => console(&format!("accept: {e}")),
        }
    }
}
