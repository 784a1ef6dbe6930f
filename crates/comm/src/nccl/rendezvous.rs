//! The TCP rendezvous that hands NCCL's unique id (128 bytes) from rank 0 to every other rank:
//! rank 0 listens on `addr`, each other rank connects (retrying until the timeout), sends its
//! rank, and reads the id. Pure std: it runs and is tested on machines without a GPU.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};
use crate::Rank;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn io_err(rank: usize, what: &str, e: std::io::Error) -> CommError {
    CommError::Unavailable(format!("rank {rank}: rendezvous {what}: {e}"))
}

/// Rank 0 calls this with the id to hand out; it returns once all `size - 1` other ranks have
/// fetched it, or fails after `timeout` naming the ranks that never connected.
pub fn serve(addr: &str, size: usize, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| io_err(0, &format!("bind {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(0, "listen", e))?;
    let start = Instant::now();
    let mut seen = vec![false; size];
    seen[0] = true;
    while seen.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| io_err(0, "accept", e))?;
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io_err(0, "accept", e))?;
                let mut r = [0u8; 8];
                s.read_exact(&mut r)
                    .map_err(|e| io_err(0, "read rank", e))?;
                let r = u64::from_le_bytes(r) as usize;
                if r == 0 || r >= size || seen[r] {
                    return Err(CommError::InvalidGroup(format!(
                        "rendezvous on {addr}: rank {r} connected (world of {size}, twice or out of range)"
                    )));
                }
                s.write_all(id).map_err(|e| io_err(0, "send id", e))?;
                seen[r] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    let missing: Vec<usize> = (0..size).filter(|&r| !seen[r]).collect();
                    return Err(CommError::Timeout {
                        rank: Rank(0),
                        op: format!("NCCL rendezvous on {addr}"),
                        waited: timeout,
                        detail: format!("ranks {missing:?} never connected"),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err(0, "accept", e)),
        }
    }
    Ok(())
}

/// A rank other than 0 fetches the id from `addr`, retrying the connection until `timeout`.
pub fn fetch(addr: &str, rank: usize, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| io_err(rank, "connect", e))?;
                s.write_all(&(rank as u64).to_le_bytes())
                    .map_err(|e| io_err(rank, "send rank", e))?;
                let mut id = [0u8; ID_BYTES];
                s.read_exact(&mut id)
                    .map_err(|e| io_err(rank, "read id", e))?;
                return Ok(id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_id_and_a_missing_rank_is_named() {
        let addr = "127.0.0.1:47613";
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let server = std::thread::spawn(move || serve(addr, 4, &id, Duration::from_secs(10)));
        let clients: Vec<_> = (1..4)
            .map(|r| std::thread::spawn(move || fetch(addr, r, Duration::from_secs(10))))
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), id);
        }
        server.join().unwrap().unwrap();

        let addr = "127.0.0.1:47614";
        let server = std::thread::spawn(move || serve(addr, 3, &id, Duration::from_millis(400)));
        fetch(addr, 2, Duration::from_secs(5)).unwrap();
        let err = server.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("ranks [1] never connected"), "{err}");
    }
}
