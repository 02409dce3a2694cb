//! `chappe up` started as the README says, and two `chappe` client processes
//! chatting through it, driven as a person would from two terminals.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const CHAPPE: &str = env!("CARGO_BIN_EXE_chappe");
const WAIT: Duration = Duration::from_secs(30);

/// A `chappe` command for one profile.
fn chappe(home: &Path, server: &str, profile: &str) -> Command {
    let mut cmd = Command::new(CHAPPE);
    cmd.env("CHAPPE_HOME", home)
        .env("CHAPPE_SERVER", server)
        .env("CHAPPE_PROFILE", profile)
        .env("CHAPPE_PASSPHRASE", format!("{profile} passphrase"))
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: Command, args: &[&str]) -> String {
    let out = tokio::time::timeout(WAIT, cmd.args(args).output())
        .await
        .expect("command finishes in time")
        .expect("command runs");
    assert!(
        out.status.success(),
        "chappe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Reads lines until one contains `needle`; returns it.
async fn wait_for_line(lines: &mut Lines<BufReader<ChildStdout>>, needle: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match lines.next_line().await.expect("readable") {
                Some(line) if line.contains(needle) => return line,
                Some(_) => continue,
                None => panic!("output ended before {needle:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no line with {needle:?} in time"))
}

struct Chat {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Chat {
    fn start(mut cmd: Command, conversation: &str) -> Chat {
        let mut child = cmd
            .args(["chat", conversation])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chat starts");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Chat { child, lines }
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("typed");
        stdin.flush().await.expect("flushed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chappe_processes_chat_through_chappe_up() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");

    // `chappe up`, as the README says, on a free port.
    let mut up = Command::new(CHAPPE)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chappe up starts");
    let mut up_out = BufReader::new(up.stdout.take().unwrap()).lines();
    let banner = wait_for_line(&mut up_out, "Chappe is up").await;
    let server = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the banner names the gateway")
        .to_owned();

    // Two people, each in their own terminal.
    let login = output(
        chappe(&home, &server, "alice"),
        &["login", "--user", "alice", "--device", "laptop"],
    )
    .await;
    assert!(login.contains("logged in as alice/laptop"), "{login}");
    output(
        chappe(&home, &server, "bob"),
        &["login", "--user", "bob", "--device", "phone"],
    )
    .await;
    let conversation = output(chappe(&home, &server, "alice"), &["create", "bob"])
        .await
        .trim()
        .to_owned();
    assert!(conversation.starts_with('c'), "{conversation}");
    let listed = output(chappe(&home, &server, "bob"), &["conversations"]).await;
    assert!(
        listed.contains(&conversation),
        "bob sees the conversation: {listed}"
    );

    let mut alice = Chat::start(chappe(&home, &server, "alice"), &conversation);
    let mut bob = Chat::start(chappe(&home, &server, "bob"), &conversation);
    // Let both streams open before typing.
    tokio::time::sleep(Duration::from_millis(500)).await;

    alice.say("Bonjour Bob, réunion à 15h ?").await;
    let line = wait_for_line(&mut bob.lines, "Bonjour Bob").await;
    assert!(
        line.contains("alice/laptop: Bonjour Bob, réunion à 15h ?"),
        "{line}"
    );

    bob.say("Oui, salle Chappe.").await;
    let line = wait_for_line(&mut alice.lines, "salle Chappe").await;
    assert!(line.contains("bob/phone: Oui, salle Chappe."), "{line}");

    // Leaving the chat (Ctrl-D) ends the process cleanly.
    drop(alice.child.stdin.take());
    let status = tokio::time::timeout(WAIT, alice.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    bob.child.kill().await.unwrap();

    // History, from a fresh process, shows both lines decrypted.
    let history = output(chappe(&home, &server, "alice"), &["history", &conversation]).await;
    assert!(history.contains("alice/laptop: Bonjour Bob"), "{history}");
    assert!(
        history.contains("bob/phone: Oui, salle Chappe."),
        "{history}"
    );

    // A profile is used by one process at a time, and says so.
    let mut cmd = chappe(&home, &server, "bob");
    let _listener = cmd
        .arg("listen")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = chappe(&home, &server, "bob")
        .args(["send", &conversation, "again"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());

    // SIGTERM drains and exits cleanly.
    let pid = up.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "chappe up exits 0 on SIGTERM: {status:?}");
}

#[tokio::test]
async fn bad_command_lines_exit_64_with_a_clear_message() {
    let out = Command::new(CHAPPE)
        .args(["up", "--listen", "nowhere"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = Command::new(CHAPPE)
        .args(["send", "x", "y"])
        .env_remove("CHAPPE_PASSPHRASE")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("passphrase"));
}
