//! A fault-injecting TCP proxy on 127.0.0.1: a worker connects to it instead of its broker
//! or result store, and the harness breaks the path between them on demand — the faults a
//! real network has, none of which a clean `kill` shows:
//!
//! * **latency**: every chunk waits before it is passed on;
//! * **stall**: the open connections stop carrying anything either way, with no FIN and no
//!   RST (a peer that froze, a cable pulled, a firewall that drops) — only heartbeats can
//!   tell; new connections pass, as they would to a broker that came back elsewhere;
//! * **reset**: every open connection is closed with a TCP RST;
//! * **half-open**: the broker side of every connection is closed, and the worker side is
//!   kept open and silent, its writes swallowed (a peer that rebooted and forgot it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the connections that are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass every byte at once.
    None,
    /// Hold every chunk this long before passing it on.
    Latency(Duration),
    /// Pass nothing on the open connections (new ones pass).
    Stall,
}

/// The fault in force, and which connections a stall holds: those numbered below
/// `stalled_below` (the ones open when it began).
#[derive(Debug, Clone, Copy)]
struct Faults {
    fault: Fault,
    stalled_below: usize,
}

/// One proxied connection: how to end it.
struct Link {
    /// Cancels both pumps and resets both sockets.
    reset: CancellationToken,
    /// Cancels the broker side only, leaving the worker's side open and silent.
    half_open: CancellationToken,
}

/// A running proxy; stopped (and every connection reset) when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    fault: watch::Sender<Faults>,
    links: Arc<Mutex<Vec<Link>>>,
    stop: CancellationToken,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and passes each connection on to `upstream`.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (fault, faults) = watch::channel(Faults {
            fault: Fault::None,
            stalled_below: 0,
        });
        let links = Arc::new(Mutex::new(Vec::<Link>::new()));
        let stop = CancellationToken::new();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (accepting, stopped, counted) =
            (Arc::clone(&links), stop.clone(), Arc::clone(&connections));
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue; // the client sees its connection closed, as with a dead broker
                };
                let number = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let link = Link {
                    reset: stopped.child_token(),
                    half_open: CancellationToken::new(),
                };
                tokio::spawn(carry(
                    client,
                    server,
                    (faults.clone(), number),
                    link.reset.clone(),
                    link.half_open.clone(),
                ));
                accepting
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(link);
            }
        });
        Ok(Self {
            address,
            fault,
            links,
            stop,
            connections,
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connections accepted so far (a reconnect shows as one more).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies `fault` until the next call: latency to every connection, open or new; a
    /// stall to the connections open now.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(Faults {
            fault,
            stalled_below: self.connections(),
        });
    }

    /// Resets (TCP RST) every open connection.
    pub fn reset_all(&self) {
        for link in self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            link.reset.cancel();
        }
    }

    /// Closes the broker side of every open connection and keeps the client side open and
    /// silent.
    pub fn half_open_all(&self) {
        for link in self
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            link.half_open.cancel();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Carries one connection both ways until it ends, under the proxy's current fault. Both
/// sockets linger zero seconds, so dropping them (a reset, or the proxy stopping) sends an
/// RST; a peer that closes its side cleanly is still answered with a FIN.
async fn carry(
    client: TcpStream,
    server: TcpStream,
    (faults, number): (watch::Receiver<Faults>, usize),
    reset: CancellationToken,
    half_open: CancellationToken,
) {
    for stream in [&client, &server] {
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }
    // `io::split`, not `into_split`: its halves do not shut the socket down when dropped,
    // so a reset closes both sockets with an RST and nothing before it.
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let upstream = towards_server(
        client_read,
        server_write,
        (faults.clone(), number),
        half_open.clone(),
    );
    let downstream = towards_client(server_read, client_write, (faults, number), half_open);
    tokio::select! {
        () = reset.cancelled() => {}
        _ = async { tokio::join!(upstream, downstream) } => {}
    }
}

/// The client's bytes to the server. Half-open, the server's side is closed and what the
/// client sends is read and dropped.
async fn towards_server(
    mut from: ReadHalf<TcpStream>,
    to: WriteHalf<TcpStream>,
    (mut faults, number): (watch::Receiver<Faults>, usize),
    half_open: CancellationToken,
) {
    let mut to = Some(to);
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            () = half_open.cancelled(), if to.is_some() => {
                to = None;
                continue;
            }
            read = from.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(writer) = to.as_mut() else { continue };
        if !hold(&mut faults, number).await || writer.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    if let Some(mut writer) = to {
        let _ = writer.shutdown().await;
    }
}

/// The server's bytes to the client. Half-open, nothing more reaches the client, and its
/// side is kept open (no FIN) until the connection is reset or the proxy stops.
async fn towards_client(
    mut from: ReadHalf<TcpStream>,
    mut to: WriteHalf<TcpStream>,
    (mut faults, number): (watch::Receiver<Faults>, usize),
    half_open: CancellationToken,
) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            () = half_open.cancelled() => {
                drop(from);
                let never: std::convert::Infallible = std::future::pending().await;
                match never {}
            }
            read = from.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !hold(&mut faults, number).await || to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Waits as the current fault says before a chunk of connection `number` passes: not at
/// all, its latency, or until a stall of the connections open when it began is lifted.
/// False when the proxy is gone.
async fn hold(faults: &mut watch::Receiver<Faults>, number: usize) -> bool {
    loop {
        let Faults {
            fault,
            stalled_below,
        } = *faults.borrow_and_update();
        match fault {
            Fault::None => return true,
            Fault::Latency(delay) => {
                tokio::time::sleep(delay).await;
                return true;
            }
            Fault::Stall if number >= stalled_below => return true,
            Fault::Stall => {
                if faults.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port; each connection echoes until closed.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut reply = [0_u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut reply)).await {
            Ok(read) => read.map(|_| reply.to_vec()),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    #[tokio::test]
    async fn faults_hold_stall_reset_and_half_open_a_connection() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        assert_eq!(
            round_trip(&mut stream, Duration::from_secs(5))
                .await
                .unwrap(),
            b"ping"
        );

        proxy.set(Fault::Latency(Duration::from_millis(100)));
        let started = std::time::Instant::now();
        round_trip(&mut stream, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "held both ways"
        );

        proxy.set(Fault::Stall);
        let stalled = round_trip(&mut stream, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            stalled.kind(),
            std::io::ErrorKind::TimedOut,
            "no FIN, no RST: silence"
        );
        let mut fresh = TcpStream::connect(proxy.address()).await.unwrap();
        round_trip(&mut fresh, Duration::from_secs(5))
            .await
            .unwrap();
        proxy.set(Fault::None);
        let mut held = [0_u8; 4];
        stream.read_exact(&mut held).await.unwrap();
        assert_eq!(&held, b"ping", "what was held passes once the stall lifts");

        proxy.reset_all();
        let mut byte = [0_u8; 1];
        let reset = stream.read(&mut byte).await.unwrap_err();
        assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);

        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        round_trip(&mut stream, Duration::from_secs(5))
            .await
            .unwrap();
        proxy.half_open_all();
        let silent = round_trip(&mut stream, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            silent.kind(),
            std::io::ErrorKind::TimedOut,
            "writes swallowed, no reply, no FIN"
        );
        assert_eq!(proxy.connections(), 3);
    }
}
