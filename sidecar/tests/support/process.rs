//! The real `sidecar` binary as a child process: for start-up behaviour, the command line, and memory bounds
//! measured on the sidecar alone.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn sidecar_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sidecar"))
}

/// Runs the binary to completion with a deadline (for `check` and failed starts).
pub fn run_to_end(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sidecar");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(super::DEADLINE) {
        Ok(out) => out.expect("sidecar output"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("the sidecar did not exit within {:?}", super::DEADLINE);
        }
    }
}

/// A free loopback port (bound and released, for processes that take a port number).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `condition` holds, checking every 20 ms, and fails the test naming `what` when it has not held
/// within [`DEADLINE`](super::DEADLINE): [`super::eventually`] for code that cannot await (process start-up).
pub fn eventually_blocking(what: &str, condition: impl FnMut() -> bool) {
    poll_blocking(what, super::DEADLINE, condition);
}

/// [`eventually_blocking`] with a limit of its own, for a test whose assertion is the limit.
fn poll_blocking(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `addr` accepts connections (a listener the process binds after its egress one, such as the mesh
/// inbound listener), within the deadline.
pub fn until_listening(addr: SocketAddr) {
    eventually_blocking(&format!("something listens on {addr}"), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
}

/// A running sidecar process, killed on drop.
pub struct SidecarProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl SidecarProcess {
    /// Starts the binary with `SIDECAR_PORT` set and waits until it accepts connections.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_with_admin(cmd, 0)
    }

    /// As `spawn`, with the admin listener on a given port (0: any).
    pub fn spawn_with_admin(cmd: Command, admin_port: u16) -> Self {
        Self::spawn_with(cmd, admin_port, Stdio::null())
    }

    /// As `spawn`, with the process's stdout piped for the test to read.
    pub fn spawn_capturing_stdout(cmd: Command) -> (Self, std::process::ChildStdout) {
        let mut process = Self::spawn_with(cmd, 0, Stdio::piped());
        let stdout = process.child.stdout.take().expect("piped stdout");
        (process, stdout)
    }

    fn spawn_with(mut cmd: Command, admin_port: u16, stdout: Stdio) -> Self {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = cmd
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin_port}"))
            .env("SIDECAR_PORT", port.to_string())
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sidecar");
        let mut process = Self { addr, child };
        process.wait_ready();
        process
    }

    fn wait_ready(&mut self) {
        eventually_blocking("the sidecar listens", || {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the sidecar exited before listening: {status}");
            }
            false
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit by itself, within `limit`.
    pub fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut exited = None;
        poll_blocking("the sidecar exits", limit, || {
            exited = self.child.try_wait().expect("try_wait");
            exited.is_some()
        });
        exited.expect("the process exited")
    }

    /// Peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kib(&format!("/proc/{}/status", self.child.id()), "VmHWM:") * 1024
    }

    /// Current resident memory (`VmRSS`), in bytes.
    pub fn rss(&self) -> u64 {
        status_kib(&format!("/proc/{}/status", self.child.id()), "VmRSS:") * 1024
    }
}

fn status_kib(path: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(Path::new(path)).expect("read /proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a memory figure")
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
