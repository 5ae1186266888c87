//! The rendezvous of ranks in separate processes: rank 0 listens on `MASTER_ADDR:MASTER_PORT`,
//! every other rank connects and says who it is, and rank 0 hands each the same bytes (NCCL's
//! 128-byte unique id) once all have joined. After it, the collective engine bootstraps itself,
//! and the connections stay open as the job's [`Watchdog`].
//!
//! Bounded everywhere: a rank that does not join within the timeout is named in rank 0's
//! error, and the ranks that did join get that error too; a rank that cannot reach rank 0 says
//! where it tried. Every message is length-checked before anything is allocated.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::distributed::WorldInfo;
use crate::error::TrainError;

const MAGIC: &[u8; 8] = b"VSFTRDV1";
/// The most a message may carry: NCCL's id is 128 bytes; errors are short text.
const MAX_PAYLOAD: u32 = 4096;
/// Message kinds from rank 0.
const OK: u8 = 0;
const FAILED: u8 = 1;

fn err(msg: String) -> TrainError {
    TrainError::Other(msg)
}

fn address(world: &WorldInfo) -> String {
    format!("{}:{}", world.master_addr, world.master_port)
}

/// Runs this rank's side of the rendezvous. Rank 0 passes `payload` (e.g. the NCCL unique id)
/// and gets it back; the others pass `None` and receive rank 0's. The connections close
/// afterwards; [`join_group`] keeps them as the job's watchdog.
pub fn exchange(world: &WorldInfo, payload: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>, TrainError> {
    connect(world, payload, timeout).map(|(payload, _links)| payload)
}

/// [`exchange`], then the same connections watch the job: see [`Watchdog`].
pub fn join_group(world: &WorldInfo, payload: Option<&[u8]>, timeout: Duration, watch: WatchSettings) -> Result<(Vec<u8>, Watchdog), TrainError> {
    let (payload, links) = connect(world, payload, timeout)?;
    Ok((payload, Watchdog::start(world.rank, links, watch)))
}

/// The rendezvous itself: the payload, and this rank's open connections (rank 0: one per other
/// rank; the others: one to rank 0), each with the rank at its other end.
fn connect(world: &WorldInfo, payload: Option<&[u8]>, timeout: Duration) -> Result<(Vec<u8>, Vec<(usize, TcpStream)>), TrainError> {
    if world.world_size == 1 {
        return payload.map(|p| (p.to_vec(), Vec::new())).ok_or_else(|| err("rank 0 has no payload to hand out".into()));
    }
    match (world.rank, payload) {
        (0, Some(p)) => serve(world, p, timeout).map(|links| (p.to_vec(), links)),
        (0, None) => Err(err("rank 0 has no payload to hand out".into())),
        (_, Some(_)) => Err(err(format!("rank {}: only rank 0 hands out the id", world.rank))),
        (_, None) => join(world, timeout).map(|(p, link)| (p, vec![(0, link)])),
    }
}

fn serve(world: &WorldInfo, payload: &[u8], timeout: Duration) -> Result<Vec<(usize, TcpStream)>, TrainError> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(err(format!("a rendezvous payload of {} bytes is over {MAX_PAYLOAD}", payload.len())));
    }
    let addr = address(world);
    let listener = TcpListener::bind(&addr).map_err(|e| err(format!("rank 0: cannot listen on {addr} (MASTER_ADDR:MASTER_PORT): {e}")))?;
    listener.set_nonblocking(true).map_err(|e| err(format!("rank 0: {addr}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut joined: Vec<Option<TcpStream>> = (0..world.world_size).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while joined.iter().skip(1).any(Option::is_none) && problem.is_none() {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..world.world_size).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
            problem = Some(format!(
                "rank(s) {} of {} did not join the rendezvous at {addr} within {:.0} s (started? same MASTER_ADDR/MASTER_PORT? a firewall?)",
                missing.join(", "),
                world.world_size,
                timeout.as_secs_f64()
            ));
            break;
        }
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let (rank, size) = match read_hello(&mut stream) {
                    Ok(hello) => hello,
                    // Not one of ours (a port scan, another job): ignored.
                    Err(_) => continue,
                };
                let refused = if size as usize != world.world_size {
                    Some(format!("rank {rank} (from {peer}) was launched with world size {size}, rank 0 with {}", world.world_size))
                } else if rank == 0 || rank as usize >= world.world_size {
                    Some(format!("{peer} claims rank {rank}, outside 1..{}", world.world_size))
                } else if joined[rank as usize].is_some() {
                    Some(format!("two processes claim rank {rank} (the second from {peer})"))
                } else {
                    None
                };
                match refused {
                    None => joined[rank as usize] = Some(stream),
                    Some(p) => {
                        // The refused process hears why too.
                        let _ = send(&mut stream, FAILED, format!("rank 0: {p}").as_bytes());
                        problem = Some(p);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => problem = Some(format!("accepting on {addr}: {e}")),
        }
    }
    let (kind, body) = match &problem {
        None => (OK, payload.to_vec()),
        Some(p) => (FAILED, format!("rank 0: {p}").into_bytes()),
    };
    for stream in joined.iter_mut().flatten() {
        let _ = send(stream, kind, &body);
    }
    match problem {
        None => Ok(joined.into_iter().enumerate().filter_map(|(r, s)| s.map(|s| (r, s))).collect()),
        Some(p) => Err(err(format!("rank 0: {p}"))),
    }
}

fn join(world: &WorldInfo, timeout: Duration) -> Result<(Vec<u8>, TcpStream), TrainError> {
    let addr = address(world);
    let rank = world.rank;
    let deadline = Instant::now() + timeout;
    // Rank 0 may start after us: retry until the deadline.
    let mut stream = loop {
        let last = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => match TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) => e.to_string(),
                },
                None => format!("{addr} resolves to no address"),
            },
            Err(e) => format!("cannot resolve {addr}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(err(format!("rank {rank}: could not reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) within {:.0} s: {last}", timeout.as_secs_f64())));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let io = |e: std::io::Error| err(format!("rank {rank}: rendezvous with rank 0 at {addr}: {e}"));
    let mut hello = MAGIC.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world.world_size as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    // Rank 0 answers once every rank has joined, or at its deadline: wait a little longer.
    let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    stream.set_read_timeout(Some(left)).map_err(io)?;
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).map_err(|e| err(format!("rank {rank}: rank 0 at {addr} did not answer the rendezvous: {e}")))?;
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD {
        return Err(err(format!("rank {rank}: rank 0 at {addr} announced {len} bytes (at most {MAX_PAYLOAD}): not a vsft rendezvous")));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).map_err(io)?;
    match head[0] {
        OK => Ok((body, stream)),
        FAILED => Err(err(format!("rank {rank}: the rendezvous failed: {}", String::from_utf8_lossy(&body)))),
        k => Err(err(format!("rank {rank}: rank 0 at {addr} sent message kind {k}: not a vsft rendezvous"))),
    }
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<(u32, u32)> {
    let mut buf = [0u8; 16];
    stream.read_exact(&mut buf)?;
    if &buf[..8] != MAGIC {
        return Err(std::io::Error::other("not a vsft rank"));
    }
    Ok((u32::from_le_bytes(buf[8..12].try_into().expect("4")), u32::from_le_bytes(buf[12..16].try_into().expect("4"))))
}

fn send(stream: &mut TcpStream, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = vec![kind];
    msg.extend((body.len() as u32).to_le_bytes());
    msg.extend(body);
    stream.write_all(&msg)
}

/// Message kinds on the watchdog's connections, after the rendezvous.
const HEARTBEAT: u8 = 2;
const FINISHED: u8 = 3;
const STOPPED: u8 = 4;

/// How the watchdog tells a dead rank from a slow one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchSettings {
    /// How often each rank says it is alive.
    pub heartbeat: Duration,
    /// Silence after which a peer counts as gone (a machine that vanished without closing its
    /// connections). A process that dies is seen at once: the OS closes its connections.
    pub peer_timeout: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings { heartbeat: Duration::from_secs(2), peer_timeout: Duration::from_secs(60) }
    }
}

/// Why the job stopped, shared by the watchdog's threads and the communicator that polls it.
#[derive(Default)]
struct WatchState {
    failure: Mutex<Option<String>>,
    /// This rank is leaving (finished or failed): connections closing now are expected.
    leaving: AtomicBool,
}

impl WatchState {
    /// Records the first failure; later ones are consequences of it.
    fn record(&self, why: String) -> bool {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_some() {
            return false;
        }
        *f = Some(why);
        true
    }
}

/// After the rendezvous, its connections stay open as the job's liveness channel, the way
/// torch's TCPStore and NCCL watchdog keep a job from hanging: every rank sends a heartbeat to
/// rank 0 and rank 0 to every rank; a connection that closes (the process exited or was
/// killed), falls silent for `peer_timeout`, or carries a peer's "stopped" message marks the
/// job failed, and rank 0 passes the reason on to every other rank. The communicator checks
/// [`Watchdog::check`] while it waits for a collective and aborts it on a failure.
pub struct Watchdog {
    rank: usize,
    state: Arc<WatchState>,
    /// Writing halves: rank 0's to every other rank, the others' to rank 0.
    links: Arc<Vec<(usize, Mutex<TcpStream>)>>,
}

impl Watchdog {
    fn start(rank: usize, links: Vec<(usize, TcpStream)>, watch: WatchSettings) -> Watchdog {
        let state = Arc::new(WatchState::default());
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for (peer, stream) in links {
            let _ = stream.set_read_timeout(Some(watch.peer_timeout));
            let _ = stream.set_nodelay(true);
            match stream.try_clone() {
                Ok(reader) => readers.push((peer, reader)),
                Err(e) => {
                    state.record(format!("rank {rank}: cannot watch rank {peer}'s connection: {e}"));
                }
            }
            writers.push((peer, Mutex::new(stream)));
        }
        let links = Arc::new(writers);
        for (peer, reader) in readers {
            let (state, links) = (state.clone(), links.clone());
            std::thread::Builder::new()
                .name(format!("vsft-watch-{peer}"))
                .spawn(move || watch_peer(rank, peer, reader, &state, &links, watch.peer_timeout))
                .expect("spawning a watchdog thread");
        }
        {
            let (state, links) = (state.clone(), links.clone());
            std::thread::Builder::new()
                .name("vsft-heartbeat".into())
                .spawn(move || {
                    while !state.leaving.load(Ordering::SeqCst) {
                        for (_, link) in links.iter() {
                            let _ = send(&mut link.lock().unwrap_or_else(|p| p.into_inner()), HEARTBEAT, &[]);
                        }
                        std::thread::sleep(watch.heartbeat);
                    }
                })
                .expect("spawning the heartbeat thread");
        }
        Watchdog { rank, state, links }
    }

    /// `Err` with the reason once the job has failed anywhere.
    pub fn check(&self) -> Result<(), TrainError> {
        match self.state.failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(why) => Err(err(format!("rank {}: stopped because {why}", self.rank))),
            None => Ok(()),
        }
    }

    /// This rank failed with `why`: tell the others (through rank 0) before exiting.
    pub fn report_failure(&self, why: &str) {
        let why = format!("rank {} failed: {why}", self.rank);
        self.state.record(why.clone());
        self.leave(STOPPED, why.as_bytes());
    }

    /// This rank finished its work: the others may see its connections close.
    pub fn finish(&self) {
        self.leave(FINISHED, &[]);
    }

    fn leave(&self, kind: u8, body: &[u8]) {
        if self.state.leaving.swap(true, Ordering::SeqCst) {
            return;
        }
        let body = &body[..body.len().min(MAX_PAYLOAD as usize)];
        for (_, link) in self.links.iter() {
            let mut s = link.lock().unwrap_or_else(|p| p.into_inner());
            let _ = send(&mut s, kind, body);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One connection's reader: returns when the peer finishes, or after recording why the job
/// failed (and, on rank 0, telling every other rank).
fn watch_peer(rank: usize, peer: usize, mut stream: TcpStream, state: &WatchState, links: &[(usize, Mutex<TcpStream>)], timeout: Duration) {
    let why = loop {
        let mut head = [0u8; 5];
        if let Err(e) = stream.read_exact(&mut head) {
            break match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("rank {peer} sent nothing for {:.0} s (hung, or its machine is unreachable)", timeout.as_secs_f64())
                }
                _ => format!("rank {peer} exited or was killed (its connection to rank {rank} closed: {e})"),
            };
        }
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            break format!("rank {peer} sent a message of {len} bytes (at most {MAX_PAYLOAD})");
        }
        let mut body = vec![0u8; len as usize];
        if let Err(e) = stream.read_exact(&mut body) {
            break format!("rank {peer} exited or was killed (its connection to rank {rank} closed: {e})");
        }
        match head[0] {
            HEARTBEAT => continue,
            FINISHED => return,
            STOPPED => break String::from_utf8_lossy(&body).into_owned(),
            k => break format!("rank {peer} sent message kind {k}"),
        }
    };
    if state.leaving.load(Ordering::SeqCst) {
        return;
    }
    if state.record(why.clone()) && rank == 0 {
        for (_, link) in links.iter().filter(|(r, _)| *r != peer) {
            let _ = send(&mut link.lock().unwrap_or_else(|p| p.into_inner()), STOPPED, why.as_bytes());
        }
    }
}
