//! What the harnesses of long-lived outside servers (CQL nodes, the
//! kube-apiserver and its etcd) share: processes that die with the test
//! process, and temporary directories that a later test process cleans up
//! when their owner is gone.

use std::fs;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

/// The file in a server's directory that holds the id of the test process.
const OWNER_FILE: &str = "owner.pid";

/// A new directory under the system's temporary directory, named
/// `prefix…`, marked as this process's; first removes the `prefix…`
/// directories whose test process is gone (a shared server's is never
/// dropped, so its directory outlives it).
pub(crate) fn owned_temp_dir(prefix: &str) -> io::Result<TempDir> {
    remove_stale_dirs(prefix);
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
    Ok(dir)
}

fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        let owner = fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let stale = match owner {
            Some(pid) => !process_alive(pid),
            // Just created, or not ours: only when old.
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600)),
        };
        if stale {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Spawns `command` from one thread that lives as long as the test process,
/// with `PR_SET_PDEATHSIG` = SIGKILL: the server dies with the test process
/// even when no destructor runs (a static, a panic that aborts, a killed
/// test), and not when the test thread that started it ends.
pub(crate) fn spawn_tied_to_process(mut command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("chappe-testkit-spawner".to_owned())
            .spawn(move || {
                // Ends never: the sender lives in a static.
                for (mut command, reply) in receiver {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(e) = started {
            panic!("cannot start the thread that starts test servers: {e}");
        }
        Mutex::new(sender)
    });
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| io::Error::other("the test server spawner is poisoned"))?
        .send((command, reply))
        .map_err(|_| io::Error::other("the test server spawner is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the test server spawner did not answer"))?
}

/// Asks `child` to exit (SIGTERM) and waits up to `grace`; kills it
/// (SIGKILL) if it is still running then.
pub(crate) fn stop(mut child: Child, grace: Duration) {
    terminate(&child);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(child);
}

/// Sends SIGTERM to `child`, without waiting.
pub(crate) fn terminate(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// Kills `child` at once (SIGKILL), as a crash or a power loss would, and
/// reaps it.
pub(crate) fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The server in `cell`, started by its first caller with `start`; a start
/// that panicked is remembered, and every caller panics with its message
/// (so one failed start does not become a second attempt per test).
pub(crate) fn shared<T: Sync>(
    cell: &'static OnceLock<Result<T, String>>,
    start: fn() -> T,
    what: &str,
) -> &'static T {
    let result = cell.get_or_init(|| {
        std::panic::catch_unwind(start).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| format!("{what} did not start"))
        })
    });
    match result {
        Ok(server) => server,
        Err(e) => panic!("the shared {what} is not available: {e}"),
    }
}

/// `GET path` over plain HTTP/1.0 on a loopback port: the body of a 200
/// answer, `None` for anything else (refused, timed out, another status).
pub(crate) fn http_get_ok(port: u16, path: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let ok = response
        .lines()
        .next()
        .is_some_and(|status| status.split_whitespace().nth(1) == Some("200"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    ok.then(|| body.to_owned())
}
