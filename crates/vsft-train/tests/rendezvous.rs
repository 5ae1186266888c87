//! The rendezvous of ranks in separate processes over 127.0.0.1 (each rank a thread here; the
//! protocol is the same as across processes): all join, a missing rank, no rank 0, a world-size
//! mismatch, two processes claiming one rank, a stranger on the port, a port in use. Every case
//! ends with an error that names what went wrong, within its timeout.

use std::io::Write;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use vsft_train::distributed::WorldInfo;
use vsft_train::rendezvous::exchange;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn world(rank: usize, world_size: usize, port: u16) -> WorldInfo {
    WorldInfo { rank, local_rank: rank, world_size, local_world_size: world_size, master_addr: "127.0.0.1".into(), master_port: port, launcher: "torchrun" }
}

/// Runs each rank's side in a thread; fails the test if any does not return within 30 s.
fn ranks(cases: Vec<(WorldInfo, Option<Vec<u8>>, u64)>) -> Vec<Result<Vec<u8>, String>> {
    let (tx, rx) = mpsc::channel();
    let n = cases.len();
    for (i, (w, payload, timeout_ms)) in cases.into_iter().enumerate() {
        let tx = tx.clone();
        thread::spawn(move || {
            let r = exchange(&w, payload.as_deref(), Duration::from_millis(timeout_ms)).map_err(|e| e.to_string());
            tx.send((i, r)).unwrap();
        });
    }
    let mut out: Vec<Option<Result<Vec<u8>, String>>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (i, r) = rx.recv_timeout(Duration::from_secs(30)).expect("a rank hangs in the rendezvous");
        out[i] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn every_rank_gets_rank_0s_id() {
    let port = free_port();
    let id: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
    // Ranks 1 and 2 start before rank 0 listens: they retry.
    let out = ranks(vec![(world(1, 3, port), None, 10_000), (world(2, 3, port), None, 10_000), (world(0, 3, port), Some(id.clone()), 10_000)]);
    for r in out {
        assert_eq!(r.unwrap(), id);
    }
}

#[test]
fn a_missing_rank_is_named_to_everyone() {
    let port = free_port();
    let out = ranks(vec![(world(0, 3, port), Some(vec![1; 128]), 1_000), (world(1, 3, port), None, 1_000)]);
    let e0 = out[0].as_ref().unwrap_err();
    assert!(e0.contains("rank(s) 2 of 3 did not join the rendezvous at 127.0.0.1:") && e0.contains("within 1 s"), "{e0}");
    let e1 = out[1].as_ref().unwrap_err();
    assert!(e1.contains("rank 1: the rendezvous failed") && e1.contains("rank(s) 2 of 3"), "{e1}");
}

#[test]
fn no_rank_0() {
    let port = free_port();
    let out = ranks(vec![(world(1, 2, port), None, 500)]);
    let e = out[0].as_ref().unwrap_err();
    assert!(e.contains(&format!("rank 1: could not reach rank 0 at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within")), "{e}");
}

#[test]
fn mismatched_world_sizes_and_duplicate_ranks() {
    let port = free_port();
    let out = ranks(vec![(world(0, 2, port), Some(vec![0; 128]), 5_000), (world(1, 4, port), None, 5_000)]);
    assert!(out[0].as_ref().unwrap_err().contains("rank 1 (from 127.0.0.1:") && out[0].as_ref().unwrap_err().contains("world size 4, rank 0 with 2"), "{:?}", out[0]);
    assert!(out[1].as_ref().unwrap_err().contains("the rendezvous failed"), "{:?}", out[1]);

    let port = free_port();
    let out = ranks(vec![(world(0, 3, port), Some(vec![0; 128]), 5_000), (world(1, 3, port), None, 5_000), (world(1, 3, port), None, 5_000)]);
    assert!(out[0].as_ref().unwrap_err().contains("two processes claim rank 1"), "{:?}", out[0]);
}

#[test]
fn a_stranger_on_the_port_is_ignored() {
    let port = free_port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(exchange(&world(0, 2, port), Some(&[9; 128]), Duration::from_secs(10)).map_err(|e| e.to_string())).unwrap());
    // Something else connects first and sends garbage (a port scan, an HTTP probe).
    let mut stranger = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let got = exchange(&world(1, 2, port), None, Duration::from_secs(10)).unwrap();
    assert_eq!(got, vec![9; 128]);
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap(), vec![9; 128]);
}

#[test]
fn a_port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = exchange(&world(0, 2, port), Some(&[0; 128]), Duration::from_secs(1)).unwrap_err().to_string();
    assert!(e.contains(&format!("rank 0: cannot listen on 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)")), "{e}");
}
