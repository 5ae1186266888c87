//! Ranks in separate processes over 127.0.0.1 (this test binary started again as each rank):
//! the rendezvous, then the watchdog on its connections. A rank killed with SIGKILL, rank 0
//! killed, a rank that fails with an error, a peer that falls silent: every other rank stops
//! with an error naming the rank within a bounded time, never hangs; ranks that finish stop
//! quietly.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vsft_train::distributed::WorldInfo;
use vsft_train::rendezvous::{join_group, WatchSettings};

const CHILD_ENV: &str = "VSFT_WATCHDOG_TEST_RANK";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn world(rank: usize, world_size: usize, port: u16) -> WorldInfo {
    WorldInfo { rank, local_rank: rank, world_size, local_world_size: world_size, master_addr: "127.0.0.1".into(), master_port: port, launcher: "torchrun" }
}

fn fast() -> WatchSettings {
    WatchSettings { heartbeat: Duration::from_millis(100), peer_timeout: Duration::from_secs(2) }
}

/// A rank's process: `rank world port mode` in the environment. It prints `JOINED` after the
/// rendezvous, then by mode: `work` polls the watchdog (as a communicator does between
/// collectives) and exits 3 printing why it stopped; `fail` reports an error and exits 1;
/// `finish` finishes cleanly and exits 0. Nothing runs longer than 20 s.
#[test]
#[ignore = "a rank process for the tests below"]
fn rank_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let f: Vec<&str> = spec.split(' ').collect();
    let (rank, size, port, mode) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap(), f[3]);
    let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
    let payload = (rank == 0).then_some(id.as_slice());
    let (got, watchdog) = match join_group(&world(rank, size, port), payload, Duration::from_secs(10), fast()) {
        Ok(g) => g,
        Err(e) => {
            println!("RENDEZVOUS FAILED: {e}");
            std::process::exit(2);
        }
    };
    assert_eq!(got, id);
    println!("JOINED");
    let start = Instant::now();
    match mode {
        "fail" => {
            std::thread::sleep(Duration::from_millis(300));
            watchdog.report_failure("out of memory on purpose");
            std::process::exit(1);
        }
        "finish" => {
            std::thread::sleep(Duration::from_millis(300));
            watchdog.check().unwrap();
            watchdog.finish();
            std::thread::sleep(Duration::from_millis(500));
            println!("FINISHED");
            std::process::exit(0);
        }
        _ => {
            while start.elapsed() < Duration::from_secs(20) {
                if let Err(e) = watchdog.check() {
                    println!("STOPPED after {:.1} s: {e}", start.elapsed().as_secs_f64());
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("STILL RUNNING");
            std::process::exit(0);
        }
    }
}

struct Rank {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

fn spawn(rank: usize, size: usize, port: u16, mode: &str) -> Rank {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["rank_process", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, format!("{rank} {size} {port} {mode}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    Rank { child, out }
}

impl Rank {
    /// Reads lines until one holds one of `marks`; returns it from the mark on.
    fn line_starting(&mut self, marks: &[&str]) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).unwrap() == 0 {
                panic!("the rank exited before printing any of {marks:?}");
            }
            // The harness prints `test rank_process ... ` before the first line on the same line.
            if let Some(at) = marks.iter().filter_map(|m| line.find(m)).min() {
                return line[at..].trim().to_string();
            }
        }
    }

    /// The exit code, waiting at most `limit`.
    fn exit_code(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("a rank did not stop within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn start(size: usize, modes: &[&str]) -> Vec<Rank> {
    let port = free_port();
    let mut ranks: Vec<Rank> = modes.iter().enumerate().map(|(r, m)| spawn(r, size, port, m)).collect();
    for r in &mut ranks {
        assert_eq!(r.line_starting(&["JOINED", "RENDEZVOUS FAILED"]), "JOINED");
    }
    ranks
}

fn stopped(rank: &mut Rank) -> (String, i32) {
    let line = rank.line_starting(&["STOPPED", "STILL RUNNING", "FINISHED"]);
    (line, rank.exit_code(Duration::from_secs(10)))
}

#[test]
fn a_killed_rank_stops_every_other_rank() {
    let mut ranks = start(3, &["work", "work", "work"]);
    let killed_at = Instant::now();
    ranks[1].child.kill().unwrap(); // SIGKILL: no goodbye, the OS closes its sockets
    ranks[1].child.wait().unwrap();
    for r in [0, 2] {
        let (line, code) = stopped(&mut ranks[r]);
        assert_eq!(code, 3, "{line}");
        assert!(line.contains(&format!("rank {r}: stopped because rank 1 exited or was killed")), "{line}");
    }
    let took = killed_at.elapsed();
    assert!(took < Duration::from_secs(10), "the others stopped {took:?} after the kill");
    eprintln!("the other ranks stopped {:.2} s after rank 1 was killed", took.as_secs_f64());
}

#[test]
fn a_killed_rank_0_stops_the_others() {
    let mut ranks = start(2, &["work", "work"]);
    ranks[0].child.kill().unwrap();
    ranks[0].child.wait().unwrap();
    let (line, code) = stopped(&mut ranks[1]);
    assert_eq!(code, 3, "{line}");
    assert!(line.contains("rank 1: stopped because rank 0 exited or was killed"), "{line}");
}

#[test]
fn a_failing_rank_tells_everyone_why() {
    let mut ranks = start(3, &["work", "work", "fail"]);
    assert_eq!(ranks[2].exit_code(Duration::from_secs(10)), 1);
    for r in [0, 1] {
        let (line, code) = stopped(&mut ranks[r]);
        assert_eq!(code, 3, "{line}");
        assert!(line.contains(&format!("rank {r}: stopped because rank 2 failed: out of memory on purpose")), "{line}");
    }
}

#[test]
fn ranks_that_finish_stop_quietly() {
    let mut ranks = start(2, &["finish", "finish"]);
    for r in &mut ranks {
        assert_eq!(r.line_starting(&["FINISHED", "STOPPED"]), "FINISHED");
        assert_eq!(r.exit_code(Duration::from_secs(10)), 0);
    }
}

#[test]
fn a_silent_peer_is_named_after_the_peer_timeout() {
    // Rank 1 joins by hand and then says nothing (a machine that vanished without closing its
    // connections): rank 0 names it once `peer_timeout` has passed.
    let port = free_port();
    let rank0 = std::thread::spawn(move || join_group(&world(0, 2, port), Some(&[7; 128]), Duration::from_secs(10), fast()));
    let mut silent = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut hello = b"VSFTRDV1".to_vec();
    hello.extend(1u32.to_le_bytes());
    hello.extend(2u32.to_le_bytes());
    silent.write_all(&hello).unwrap();
    let mut answer = [0u8; 5 + 128];
    silent.read_exact(&mut answer).unwrap();
    let (_, watchdog) = rank0.join().unwrap().unwrap();
    let start = Instant::now();
    let e = loop {
        if let Err(e) = watchdog.check() {
            break e.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no failure after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(e.contains("rank 0: stopped because rank 1 sent nothing for 2 s"), "{e}");
    assert!(start.elapsed() >= Duration::from_millis(1500), "{:?}", start.elapsed());
}
