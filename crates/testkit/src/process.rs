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
