//! Data-parallel training across processes: every peer holds the frozen base and the
//! same trainable weights, computes the gradient of its shard of every batch, and the
//! peers sum their gradients before each optimizer step, so all of them take the same
//! step — the step one process would take on the whole batch.
//!
//! The exchange is a star over TCP: rank 0 listens on the coordinator address, the other
//! ranks connect to it. Each optimizer step, every rank sends rank 0 one frame (a
//! header naming the stage, the step and the payload length, then the flat f32
//! gradient buffer); rank 0 adds them in rank order and sends the sum back, so every
//! rank holds bit-identical values. A peer that closes its connection, stays silent
//! past the timeout, or sends a frame of another stage, step or size stops every rank
//! with a typed error; rank 0 tells the others which peer failed before it exits.
//!
//! burn-collective 0.21's multi-process all-reduce was tried first: its node sync
//! never clears the list of synced peers, so the second all-reduce of a process waits
//! forever, and a lost peer panics inside its runtime instead of returning an error.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use legora_data::stable_hash;

use crate::error::{Result, TrainError};
use crate::trainer::StepReport;

const MAGIC: [u8; 4] = *b"LGDP";
const ABORT: [u8; 4] = *b"LGAB";
const VERSION: u32 = 1;
const NAME_LEN: usize = 32;
const HEADER_LEN: usize = 4 + 4 + NAME_LEN + 8 + 8 + 8;
const HELLO_LEN: usize = 4 + 4 + 4 + 4 + 8;

/// Where a process stands in a data-parallel run (`legora train --world-size N --rank K
/// --coordinator HOST:PORT`).
#[derive(Debug, Clone, PartialEq)]
pub struct DistributedConfig {
    /// Number of processes.
    pub world_size: usize,
    /// This process's rank, `0 ≤ rank < world_size`; rank 0 coordinates and writes
    /// every output (checkpoints, adapters, metrics, report).
    pub rank: usize,
    /// `host:port` rank 0 listens on and the others connect to.
    pub coordinator: String,
    /// How long a rank waits for a peer (connecting, and at each step) before it stops
    /// with an error.
    pub timeout: Duration,
}

impl DistributedConfig {
    /// The default peer timeout, 600 s (a peer may still be loading a large base when
    /// the others reach their first step).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

    /// Check the sizes before anything connects.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(TrainError::invalid("world-size", ">= 1", 0));
        }
        if self.rank >= self.world_size {
            let expected = format!("a rank below the world size {}", self.world_size);
            return Err(TrainError::invalid("rank", expected, self.rank));
        }
        if self.timeout.is_zero() {
            return Err(TrainError::invalid("peer-timeout", "> 0 seconds", 0));
        }
        Ok(())
    }
}

/// One connection of this rank to another.
struct Link {
    peer: usize,
    stream: TcpStream,
}

/// This process's membership of a data-parallel run, connected to its peers.
pub struct Peer {
    rank: usize,
    world: usize,
    timeout: Duration,
    links: Mutex<Vec<Link>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

/// What one frame is about: the stage and step every rank must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTag<'a> {
    /// Stage name (at most 32 bytes are compared).
    pub stage: &'a str,
    /// Optimizer step.
    pub step: usize,
    /// A hash of what the payload holds (e.g. the names of the logged terms).
    pub check: u64,
}

impl Peer {
    /// Join the run: rank 0 binds the coordinator address and waits for every other
    /// rank; the others connect to it (retrying until the timeout). `fingerprint` (e.g.
    /// a hash of the run file) must be the same on every rank.
    pub fn connect(cfg: &DistributedConfig, fingerprint: u64) -> Result<Peer> {
        cfg.validate()?;
        let links = if cfg.rank == 0 {
            accept_peers(cfg, fingerprint)?
        } else {
            vec![connect_to_hub(cfg, fingerprint)?]
        };
        Ok(Peer {
            rank: cfg.rank,
            world: cfg.world_size,
            timeout: cfg.timeout,
            links: Mutex::new(links),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Whether this rank writes the run's outputs (rank 0).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// Replace `data` by its sum over all ranks (added in rank order on rank 0, so
    /// every rank gets the same bits). Every rank must call it with the same tag and
    /// length.
    pub fn all_reduce_sum(&self, tag: &FrameTag<'_>, data: &mut [f32]) -> Result<()> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let header = encode_header(tag, data.len());
        let during = format!("stage {} step {}", tag.stage, tag.step);
        if self.rank != 0 {
            let link = &mut links[0];
            let mut bytes = header.to_vec();
            bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
            self.send(link, &bytes, &during)?;
            self.receive(link, &header, data, &during)?;
            return Ok(());
        }
        let result = self.gather_sum(&mut links, &header, data, &during);
        if let Err(e) = &result {
            // the others learn which peer failed (a lost one's write fails, ignored)
            let failed = failed_peer(e).unwrap_or(0);
            for link in links.iter_mut() {
                let _ = link.stream.write_all(&encode_abort(failed));
            }
            return result;
        }
        let mut bytes = header.to_vec();
        bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        for link in links.iter_mut() {
            self.send(link, &bytes, &during)?;
        }
        Ok(())
    }

    /// Rank 0: read every peer's frame in rank order and add it into `data`.
    fn gather_sum(
        &self,
        links: &mut [Link],
        header: &[u8; HEADER_LEN],
        data: &mut [f32],
        during: &str,
    ) -> Result<()> {
        let mut other = vec![0f32; data.len()];
        for link in links.iter_mut() {
            self.receive(link, header, &mut other, during)?;
            for (d, o) in data.iter_mut().zip(&other) {
                *d += *o;
            }
        }
        Ok(())
    }

    /// Read one frame from `link` into `out`, checking its header against ours.
    fn receive(
        &self,
        link: &mut Link,
        ours: &[u8; HEADER_LEN],
        out: &mut [f32],
        during: &str,
    ) -> Result<()> {
        let mut head = [0u8; HEADER_LEN];
        self.read(link, &mut head, during)?;
        if head[..4] == ABORT {
            let failed = u64::from_le_bytes(head[HEADER_LEN - 8..].try_into().expect("8 bytes"));
            return Err(TrainError::PeerLost {
                rank: self.rank,
                peer: usize::try_from(failed).unwrap_or(usize::MAX),
                during: format!("{during} (reported by rank 0)"),
            });
        }
        self.check_header(link.peer, ours, &head)?;
        let mut bytes = vec![0u8; out.len() * 4];
        self.read(link, &mut bytes, during)?;
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        Ok(())
    }

    fn check_header(&self, peer: usize, ours: &[u8; HEADER_LEN], theirs: &[u8]) -> Result<()> {
        let mismatch = |what: &str, expected: String, found: String| TrainError::PeerMismatch {
            rank: self.rank,
            peer,
            what: what.to_string(),
            expected,
            found,
        };
        if theirs[..8] != ours[..8] {
            let show = |b: &[u8]| format!("{:?}", String::from_utf8_lossy(&b[..8]));
            return Err(mismatch("frame format", show(ours), show(theirs)));
        }
        let name = |b: &[u8]| {
            let raw = &b[8..8 + NAME_LEN];
            let end = raw.iter().position(|c| *c == 0).unwrap_or(NAME_LEN);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let field = |b: &[u8], i: usize| {
            let at = 8 + NAME_LEN + 8 * i;
            u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
        };
        if name(ours) != name(theirs) {
            return Err(mismatch("stage", name(ours), name(theirs)));
        }
        let fields = [
            "step",
            "gradient length (trainable parameters)",
            "logged terms",
        ];
        for (i, what) in fields.iter().enumerate() {
            if field(ours, i) != field(theirs, i) {
                let show = |v: u64| {
                    if i == 2 {
                        format!("{v:#x}")
                    } else {
                        v.to_string()
                    }
                };
                return Err(mismatch(what, show(field(ours, i)), show(field(theirs, i))));
            }
        }
        Ok(())
    }

    fn read(&self, link: &mut Link, buf: &mut [u8], during: &str) -> Result<()> {
        link.stream
            .read_exact(buf)
            .map_err(|e| self.io_error(link.peer, e, during))
    }

    fn send(&self, link: &mut Link, bytes: &[u8], during: &str) -> Result<()> {
        link.stream
            .write_all(bytes)
            .and_then(|_| link.stream.flush())
            .map_err(|e| self.io_error(link.peer, e, during))
    }

    fn io_error(&self, peer: usize, e: std::io::Error, during: &str) -> TrainError {
        io_error(self.rank, peer, self.timeout, e, during)
    }
}

/// The trainable gradients of a module as one flat buffer (zeros where a parameter has
/// none on this rank), then one presence flag per parameter; visit order is the
/// module's, the same on every rank.
struct Pack<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    values: Vec<f32>,
    flags: Vec<f32>,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let n = param.shape().num_elements();
        let values = self
            .grads
            .get::<B::InnerBackend, D>(param.id)
            .and_then(|g| g.into_data().convert::<f32>().to_vec::<f32>().ok())
            .filter(|v| v.len() == n);
        self.flags.push(if values.is_some() { 1.0 } else { 0.0 });
        self.values.extend(values.unwrap_or_else(|| vec![0.0; n]));
    }
}

/// Writes the summed buffer of [`Pack`] back as gradients (a parameter without a
/// gradient on every rank stays without one, as in one process).
struct Unpack<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    values: &'a [f32],
    flags: &'a [f32],
    at: usize,
    index: usize,
    _b: PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let shape = param.shape();
        let n = shape.num_elements();
        let values = &self.values[self.at..self.at + n];
        let present = self.flags[self.index] > 0.0;
        self.at += n;
        self.index += 1;
        let _ = self.grads.remove::<B::InnerBackend, D>(param.id);
        if present {
            let data = TensorData::new(values.to_vec(), shape);
            let g = Tensor::<B::InnerBackend, D>::from_data(data, &param.device());
            self.grads.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

/// Sum the step's trainable gradients, loss and logged terms over all ranks, in one
/// exchange: afterwards every rank holds the gradients and loss of the whole batch.
pub(crate) fn reduce_step<B, M>(
    peer: &Peer,
    model: &M,
    grads: &mut GradientsParams,
    report: &mut StepReport,
    stage: &str,
    step: usize,
) -> Result<()>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut pack = Pack::<B> {
        grads,
        values: Vec::new(),
        flags: Vec::new(),
        _b: PhantomData,
    };
    model.visit(&mut pack);
    let (n_values, n_flags) = (pack.values.len(), pack.flags.len());
    let mut data = pack.values;
    data.append(&mut pack.flags);
    data.push(report.loss as f32);
    data.extend(report.terms.values().map(|v| *v as f32));
    let names: Vec<&str> = report.terms.keys().map(String::as_str).collect();
    let check = stable_hash(&names.join("\n"));
    peer.all_reduce_sum(&FrameTag { stage, step, check }, &mut data)?;
    let mut unpack = Unpack::<B> {
        grads,
        values: &data[..n_values],
        flags: &data[n_values..n_values + n_flags],
        at: 0,
        index: 0,
        _b: PhantomData,
    };
    model.visit(&mut unpack);
    let extra = &data[n_values + n_flags..];
    report.loss = f64::from(extra[0]);
    for (v, e) in report.terms.values_mut().zip(&extra[1..]) {
        *v = f64::from(*e);
    }
    Ok(())
}

/// The peer a rank-0 error is about (told to the others in the abort frame).
fn failed_peer(e: &TrainError) -> Option<usize> {
    match e {
        TrainError::PeerLost { peer, .. }
        | TrainError::PeerTimeout { peer, .. }
        | TrainError::PeerMismatch { peer, .. } => Some(*peer),
        _ => None,
    }
}

fn io_error(
    rank: usize,
    peer: usize,
    timeout: Duration,
    e: std::io::Error,
    during: &str,
) -> TrainError {
    let during = during.to_string();
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TrainError::PeerTimeout {
            rank,
            peer,
            during,
            secs: timeout.as_secs_f64(),
        },
        _ => TrainError::PeerLost { rank, peer, during },
    }
}

fn encode_header(tag: &FrameTag<'_>, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    let name = tag.stage.as_bytes();
    let n = name.len().min(NAME_LEN);
    h[8..8 + n].copy_from_slice(&name[..n]);
    let at = 8 + NAME_LEN;
    h[at..at + 8].copy_from_slice(&(tag.step as u64).to_le_bytes());
    h[at + 8..at + 16].copy_from_slice(&(len as u64).to_le_bytes());
    h[at + 16..at + 24].copy_from_slice(&tag.check.to_le_bytes());
    h
}

fn encode_abort(failed: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&ABORT);
    h[HEADER_LEN - 8..].copy_from_slice(&(failed as u64).to_le_bytes());
    h
}

fn encode_hello(rank: usize, world: usize, fingerprint: u64) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(world as u32).to_le_bytes());
    h[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    h
}

/// `(rank, world, fingerprint)` of a hello, `None` when it is not one of ours.
fn decode_hello(h: &[u8; HELLO_LEN]) -> Option<(usize, usize, u64)> {
    if h[..4] != MAGIC || h[4..8] != VERSION.to_le_bytes() {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes")) as usize;
    let fp = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    Some((u32_at(8), u32_at(12), fp))
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Check a peer's hello against this rank's world size and fingerprint.
fn check_hello(
    cfg: &DistributedConfig,
    fingerprint: u64,
    hello: (usize, usize, u64),
) -> Result<usize> {
    let (rank, world, fp) = hello;
    let mismatch = |what: &str, expected: String, found: String| TrainError::PeerMismatch {
        rank: cfg.rank,
        peer: rank,
        what: what.to_string(),
        expected,
        found,
    };
    if world != cfg.world_size {
        return Err(mismatch(
            "world size",
            cfg.world_size.to_string(),
            world.to_string(),
        ));
    }
    if fp != fingerprint {
        let show = |v: u64| format!("{v:#018x}");
        return Err(mismatch("run file (its hash)", show(fingerprint), show(fp)));
    }
    Ok(rank)
}

/// Rank 0: bind the coordinator address and accept one connection per other rank.
fn accept_peers(cfg: &DistributedConfig, fingerprint: u64) -> Result<Vec<Link>> {
    let coordinator_error = |message: String| TrainError::Coordinator {
        rank: 0,
        addr: cfg.coordinator.clone(),
        message,
    };
    let listener = TcpListener::bind(&cfg.coordinator)
        .map_err(|e| coordinator_error(format!("cannot listen: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| coordinator_error(e.to_string()))?;
    let deadline = Instant::now() + cfg.timeout;
    let mut links: Vec<Link> = Vec::new();
    while links.len() + 1 < cfg.world_size {
        let (stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing = (1..cfg.world_size)
                        .find(|r| links.iter().all(|l| l.peer != *r))
                        .unwrap_or(1);
                    let during = "joining the run".to_string();
                    return Err(TrainError::PeerTimeout {
                        rank: 0,
                        peer: missing,
                        during,
                        secs: cfg.timeout.as_secs_f64(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(coordinator_error(format!("accept failed: {e}"))),
        };
        configure(&stream, cfg.timeout).map_err(|e| coordinator_error(e.to_string()))?;
        let mut stream = stream;
        let mut hello = [0u8; HELLO_LEN];
        let hello = stream
            .read_exact(&mut hello)
            .ok()
            .and_then(|_| decode_hello(&hello));
        let Some(hello) = hello else {
            return Err(coordinator_error(format!(
                "{from} connected but is not a legora peer (no valid hello)"
            )));
        };
        let rank = check_hello(cfg, fingerprint, hello)?;
        if rank == 0 || rank >= cfg.world_size || links.iter().any(|l| l.peer == rank) {
            return Err(coordinator_error(format!(
                "{from} joined as rank {rank}, which is {} (world size {})",
                if rank == 0 || rank >= cfg.world_size {
                    "not a peer rank"
                } else {
                    "taken"
                },
                cfg.world_size
            )));
        }
        links.push(Link { peer: rank, stream });
    }
    links.sort_by_key(|l| l.peer);
    let hello = encode_hello(0, cfg.world_size, fingerprint);
    for link in &mut links {
        link.stream
            .write_all(&hello)
            .map_err(|e| io_error(0, link.peer, cfg.timeout, e, "joining the run"))?;
    }
    Ok(links)
}

/// Ranks above 0: connect to the coordinator (retrying until the timeout) and exchange
/// hellos.
fn connect_to_hub(cfg: &DistributedConfig, fingerprint: u64) -> Result<Link> {
    let coordinator_error = |message: String| TrainError::Coordinator {
        rank: cfg.rank,
        addr: cfg.coordinator.clone(),
        message,
    };
    let addrs: Vec<_> = cfg
        .coordinator
        .to_socket_addrs()
        .map_err(|e| coordinator_error(format!("not a reachable host:port: {e}")))?
        .collect();
    let deadline = Instant::now() + cfg.timeout;
    let mut stream = loop {
        if let Some(s) = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
        {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(TrainError::PeerTimeout {
                rank: cfg.rank,
                peer: 0,
                during: "joining the run (nothing listens on the coordinator address)".into(),
                secs: cfg.timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let during = "joining the run";
    configure(&stream, cfg.timeout).map_err(|e| coordinator_error(e.to_string()))?;
    stream
        .write_all(&encode_hello(cfg.rank, cfg.world_size, fingerprint))
        .map_err(|e| io_error(cfg.rank, 0, cfg.timeout, e, during))?;
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello)
        .map_err(|e| io_error(cfg.rank, 0, cfg.timeout, e, during))?;
    let Some(hello) = decode_hello(&hello) else {
        return Err(coordinator_error(
            "answered, but is not a legora coordinator".into(),
        ));
    };
    check_hello(cfg, fingerprint, hello)?;
    Ok(Link { peer: 0, stream })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rank: usize, world: usize, port: u16) -> DistributedConfig {
        DistributedConfig {
            world_size: world,
            rank,
            coordinator: format!("127.0.0.1:{port}"),
            timeout: Duration::from_secs(10),
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn three_ranks_sum_in_rank_order_and_agree() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let peer = Peer::connect(&cfg(r, 3, port), 7).unwrap();
                    let mut out = Vec::new();
                    for step in 0..3 {
                        let tag = FrameTag {
                            stage: "experts",
                            step,
                            check: 1,
                        };
                        let mut v = vec![r as f32 + step as f32, 0.1 * (r + 1) as f32];
                        peer.all_reduce_sum(&tag, &mut v).unwrap();
                        out.push(v);
                    }
                    out
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for step in 0..3 {
            let want0 = (0..3).map(|r| (r + step) as f32).sum::<f32>();
            let want1 = (0.1f32 + 0.2) + 0.3;
            for r in &results {
                assert_eq!(r[step], vec![want0, want1]);
            }
        }
    }

    #[test]
    fn a_peer_at_another_step_or_size_is_refused() {
        let port = free_port();
        let other = std::thread::spawn(move || {
            let peer = Peer::connect(&cfg(1, 2, port), 7).unwrap();
            let mut v = vec![0f32; 3];
            peer.all_reduce_sum(
                &FrameTag {
                    stage: "router",
                    step: 4,
                    check: 1,
                },
                &mut v,
            )
        });
        let peer = Peer::connect(&cfg(0, 2, port), 7).unwrap();
        let mut v = vec![0f32; 3];
        let err = peer
            .all_reduce_sum(
                &FrameTag {
                    stage: "router",
                    step: 3,
                    check: 1,
                },
                &mut v,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 1 differs in step: expected 3, found 4"),
            "{err}"
        );
        let err = other.join().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("rank 1 closed the connection") || err.contains("reported by rank 0"),
            "{err}"
        );
    }

    #[test]
    fn a_lost_peer_is_an_error_not_a_hang() {
        let port = free_port();
        let gone = std::thread::spawn(move || drop(Peer::connect(&cfg(1, 2, port), 7).unwrap()));
        let peer = Peer::connect(&cfg(0, 2, port), 7).unwrap();
        gone.join().unwrap();
        let mut v = vec![1f32];
        let err = peer
            .all_reduce_sum(
                &FrameTag {
                    stage: "experts",
                    step: 0,
                    check: 0,
                },
                &mut v,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                TrainError::PeerLost {
                    rank: 0,
                    peer: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn world_size_and_run_file_must_match() {
        let port = free_port();
        let other = std::thread::spawn(move || Peer::connect(&cfg(1, 2, port), 8).map(|_| ()));
        let err = Peer::connect(&cfg(0, 2, port), 7).unwrap_err().to_string();
        assert!(err.contains("differs in run file"), "{err}");
        assert!(other.join().unwrap().is_err());
        let bad = cfg(2, 2, port).validate().unwrap_err().to_string();
        assert!(
            bad.contains("`rank`") && bad.contains("below the world size 2"),
            "{bad}"
        );
    }

    #[test]
    fn nobody_at_the_coordinator_times_out() {
        let mut c = cfg(1, 2, free_port());
        c.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let err = Peer::connect(&c, 7).unwrap_err();
        assert!(
            matches!(err, TrainError::PeerTimeout { peer: 0, .. }),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
