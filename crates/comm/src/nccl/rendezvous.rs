//! How NCCL's unique id (128 bytes) reaches every rank. Under `mpirun` it is broadcast over the
//! MPI world ([`share_id`], any communicator works). Without one, over TCP: rank 0 listens on
//! `addr`, each other rank connects (retrying until the job's timeout) and proves that it knows
//! the job's secret before it gets anything. Pure std and RustCrypto's HMAC: it runs and is
//! tested on machines without a GPU.
//!
//! The trust model (as MPI's and NCCL's own bootstraps assume): the network between the ranks
//! is the job's, not the internet; nobody on it is trusted who cannot show the secret the
//! launcher gave every rank (`HOTSPA_NCCL_SECRET`). The handshake: rank 0 sends a fresh 32-byte
//! nonce; the rank answers with a magic, its rank and `HMAC-SHA256(secret, nonce ‖ rank)`; rank
//! 0 checks it (in constant time) and sends the id masked by a keystream of
//! `HMAC-SHA256(secret, nonce ‖ "id" ‖ i)`, so that the id never crosses the network in clear.
//! A connection that fails the handshake — a stranger, a port scanner, a client that says
//! nothing — is dropped after at most [`HANDSHAKE`] without failing the job; every connection
//! is handled on its own thread, so none holds rank 0 up. Not defended against: someone who
//! can read the ranks' memory or environment, or who sits on the network path and tampers with
//! NCCL's own traffic afterwards (NCCL does not authenticate it).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{CommError, Result};
use crate::{Communicator, Rank};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;
/// The environment variable that holds the job's secret.
pub const SECRET_VAR: &str = "HOTSPA_NCCL_SECRET";
/// How long one connection may take to prove itself.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// The first bytes of a rank's answer (the protocol's name and version).
const MAGIC: &[u8; 8] = b"HSPARDV1";

type HmacSha256 = Hmac<Sha256>;

fn io_err(rank: usize, what: &str, e: std::io::Error) -> CommError {
    CommError::Unavailable(format!("rank {rank}: rendezvous {what}: {e}"))
}

/// The job's secret from [`SECRET_VAR`]; refused when unset or shorter than 16 bytes.
pub fn secret_from_env() -> Result<Vec<u8>> {
    match std::env::var(SECRET_VAR) {
        Ok(s) if s.len() >= 16 => Ok(s.into_bytes()),
        Ok(_) => Err(CommError::Unavailable(format!(
            "{SECRET_VAR} is shorter than 16 characters; give every rank the same longer secret"
        ))),
        Err(_) => Err(CommError::Unavailable(format!(
            "{SECRET_VAR} is not set: without mpirun, rank 0 hands NCCL's id only to ranks that \
             prove the job's secret; the launcher must give every rank the same one, e.g. \
             `export {SECRET_VAR}=$(head -c 24 /dev/urandom | base64)` (under mpirun the id \
             travels over MPI instead)"
        ))),
    }
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // An HMAC takes a key of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m
}

/// The id masked (or unmasked: the same XOR) with the keystream of `secret` and `nonce`.
fn mask(secret: &[u8], nonce: &[u8; 32], id: &[u8; ID_BYTES]) -> [u8; ID_BYTES] {
    let mut out = *id;
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let block = mac(secret, &[nonce, b"id", &[i as u8]])
            .finalize()
            .into_bytes();
        for (b, k) in chunk.iter_mut().zip(block.iter()) {
            *b ^= k;
        }
    }
    out
}

/// A fresh nonce from the OS's random source.
fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| io_err(0, "random nonce", e))?;
    Ok(n)
}

/// One connection's handshake on rank 0: the rank it proved, or why it was dropped.
fn admit(
    mut s: TcpStream,
    secret: &[u8],
    id: &[u8; ID_BYTES],
    size: usize,
) -> std::result::Result<(usize, TcpStream, [u8; ID_BYTES]), String> {
    let fail = |e: std::io::Error| e.to_string();
    s.set_nonblocking(false).map_err(fail)?;
    s.set_read_timeout(Some(HANDSHAKE)).map_err(fail)?;
    s.set_write_timeout(Some(HANDSHAKE)).map_err(fail)?;
    let n = nonce().map_err(|e| e.to_string())?;
    s.write_all(&n).map_err(fail)?;
    let mut answer = [0u8; 8 + 8 + 32];
    s.read_exact(&mut answer)
        .map_err(|e| format!("no answer ({e})"))?;
    if &answer[..8] != MAGIC {
        return Err("not a hotspa rank (wrong magic)".into());
    }
    let rank_bytes = &answer[8..16];
    let r = u64::from_le_bytes(rank_bytes.try_into().unwrap_or_default()) as usize;
    mac(secret, &[&n, rank_bytes])
        .verify_slice(&answer[16..])
        .map_err(|_| "wrong secret".to_string())?;
    if r == 0 || r >= size {
        return Err(format!("proved the secret but claims rank {r} of {size}"));
    }
    Ok((r, s, mask(secret, &n, id)))
}

/// Rank 0 calls this with the id to hand out; it returns once all `size - 1` other ranks have
/// proved the secret and fetched it, or fails after `timeout` naming the ranks that never did.
/// Strangers are dropped (each within [`HANDSHAKE`]) and said on stderr; the job goes on.
pub fn serve(
    addr: &str,
    size: usize,
    id: &[u8; ID_BYTES],
    secret: &[u8],
    timeout: Duration,
) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| io_err(0, &format!("bind {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(0, "listen", e))?;
    let start = Instant::now();
    let mut seen = vec![false; size];
    seen[0] = true;
    let (tx, rx) = mpsc::channel();
    while seen.iter().any(|s| !s) {
        match listener.accept() {
            Ok((s, from)) => {
                let (tx, secret, id) = (tx.clone(), secret.to_vec(), *id);
                std::thread::spawn(move || {
                    let _ = tx.send((from, admit(s, &secret, &id, size)));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err(0, "accept", e)),
        }
        while let Ok((from, result)) = rx.try_recv() {
            match result {
                Ok((r, _, _)) if seen[r] => {
                    return Err(CommError::InvalidGroup(format!(
                        "rendezvous on {addr}: rank {r} connected twice (the second from {from}): \
                         two processes were launched as the same rank"
                    )))
                }
                Ok((r, mut s, masked)) => {
                    s.write_all(&masked).map_err(|e| io_err(0, "send id", e))?;
                    seen[r] = true;
                }
                Err(why) => eprintln!(
                    "NCCL rendezvous on {addr}: a connection from {from} was dropped: {why}"
                ),
            }
        }
        if start.elapsed() > timeout {
            let missing: Vec<usize> = (0..size).filter(|&r| !seen[r]).collect();
            return Err(CommError::Timeout {
                rank: Rank(0),
                op: format!("NCCL rendezvous on {addr}"),
                waited: timeout,
                detail: format!("ranks {missing:?} never connected with the job's secret"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A rank other than 0 fetches the id from `addr`, proving `secret`, retrying the connection
/// until `timeout`.
pub fn fetch(addr: &str, rank: usize, secret: &[u8], timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io_err(rank, "connect", e))?;
                let mut n = [0u8; 32];
                s.read_exact(&mut n)
                    .map_err(|e| io_err(rank, "read nonce", e))?;
                let r = (rank as u64).to_le_bytes();
                let proof = mac(secret, &[&n, &r]).finalize().into_bytes();
                let mut answer = Vec::with_capacity(48);
                answer.extend_from_slice(MAGIC);
                answer.extend_from_slice(&r);
                answer.extend_from_slice(&proof);
                s.write_all(&answer)
                    .map_err(|e| io_err(rank, "send proof", e))?;
                let mut masked = [0u8; ID_BYTES];
                s.read_exact(&mut masked).map_err(|e| {
                    io_err(
                        rank,
                        "read id (rank 0 dropped this rank: is HOTSPA_NCCL_SECRET the same on every rank?)",
                        e,
                    )
                })?;
                return Ok(mask(secret, &n, &masked));
            }
            Err(e) => {
                if start.elapsed() > timeout {
                    return Err(CommError::Timeout {
                        rank: Rank(rank),
                        op: format!("NCCL rendezvous on {addr}"),
                        waited: timeout,
                        detail: format!("rank 0 never answered ({e})"),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The id from `world`'s rank 0 (which passes `Some(id)`) to every member, as the exact bytes,
/// over the communicator (under `mpirun`, MPI): no listening socket at all.
pub fn share_id(world: &dyn Communicator, id: Option<[u8; ID_BYTES]>) -> Result<[u8; ID_BYTES]> {
    let mut words = vec![0u64; ID_BYTES / 8];
    if let Some(id) = id {
        for (w, b) in words.iter_mut().zip(id.chunks(8)) {
            *w = u64::from_le_bytes(b.try_into().unwrap_or_default());
        }
    }
    let mut buf = crate::words::encode(&words);
    world.broadcast(&mut buf, Rank(0))?;
    let words = crate::words::decode(&buf)?;
    let mut out = [0u8; ID_BYTES];
    for (o, w) in out.chunks_mut(8).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a secret of the job, 32 bytes ok";

    fn id() -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        id
    }

    #[test]
    fn every_rank_with_the_secret_gets_the_id_and_a_missing_rank_is_named() {
        let addr = "127.0.0.1:47613";
        let id = id();
        let server =
            std::thread::spawn(move || serve(addr, 4, &id, SECRET, Duration::from_secs(10)));
        let clients: Vec<_> = (1..4)
            .map(|r| std::thread::spawn(move || fetch(addr, r, SECRET, Duration::from_secs(10))))
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), id);
        }
        server.join().unwrap().unwrap();

        let addr = "127.0.0.1:47614";
        let server =
            std::thread::spawn(move || serve(addr, 3, &id, SECRET, Duration::from_millis(400)));
        fetch(addr, 2, SECRET, Duration::from_secs(5)).unwrap();
        let err = server.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("ranks [1] never connected"), "{err}");
    }

    #[test]
    fn strangers_are_dropped_without_holding_up_or_failing_the_job() {
        let addr = "127.0.0.1:47615";
        let id = id();
        let server =
            std::thread::spawn(move || serve(addr, 3, &id, SECRET, Duration::from_secs(20)));
        // A client that connects and says nothing, one that sends 8 bytes (the old protocol),
        // one with the wrong secret.
        let silent = loop {
            if let Ok(s) = TcpStream::connect(addr) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut old = TcpStream::connect(addr).unwrap();
        old.write_all(&1u64.to_le_bytes()).unwrap();
        let wrong = fetch(
            addr,
            1,
            b"not the secret of this job at all",
            Duration::from_secs(5),
        );
        assert!(wrong.is_err(), "a wrong secret got an id");
        let mut got = [0u8; ID_BYTES];
        old.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let n = old.read(&mut got).unwrap_or(0);
        assert!(n <= 32, "the 8-byte client got more than the nonce");
        // The real ranks get through at once, while the silent one still holds its socket.
        let t = Instant::now();
        let ranks: Vec<_> = (1..3)
            .map(|r| std::thread::spawn(move || fetch(addr, r, SECRET, Duration::from_secs(10))))
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap().unwrap(), id);
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        server.join().unwrap().unwrap();
        drop(silent);
    }

    #[test]
    fn the_id_crosses_a_communicator_exactly() {
        let id = id();
        let got = crate::ThreadComm::run(3, move |c| -> Result<[u8; ID_BYTES]> {
            share_id(&c, (c.rank().0 == 0).then_some(id))
        })
        .unwrap();
        assert!(got.iter().all(|g| *g == id));
    }
}
