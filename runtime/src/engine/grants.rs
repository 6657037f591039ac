//! What one call may reach beyond its own memory: host folders, outbound TCP connections
//! and named variables — [`Grants`], deny by default.
//!
//! A call's WASI context starts with nothing: no preopened folder, no environment, no
//! sockets, no name lookups. Each grant opens exactly one door, in the call's fresh `Store`
//! only:
//!
//! - **Folders** ([`DirGrant`]): a host folder the task sees at an absolute guest path,
//!   read-only unless `writable`. wasmtime-wasi resolves every path the guest opens beneath
//!   the folder's handle (`openat2(RESOLVE_BENEATH)` on Linux), so `..`, absolute host paths
//!   and symlinks pointing out of the folder are refused by the host, never by a check here;
//!   wasmq never joins a host path with anything a task sent. A read-only grant refuses
//!   every write, create, truncate, rename and removal. WASI has no disk quota: a writable
//!   folder is bounded by the host filesystem only.
//! - **Network** ([`NetworkGrant`]): outbound TCP connections to the addresses its
//!   [`NetworkRule`]s allow, nothing else. Binding to a chosen address, listening, accepting
//!   and UDP are always refused. Rules name IP addresses, CIDR networks or host names; a
//!   host name rule allows the addresses the *worker* resolves the name to when the guest
//!   connects (cached for [`HOST_TTL`]), never what the guest's own lookup said. An
//!   address in a loopback, private, link-local,
//!   unspecified, multicast, reserved or CGNAT range is reached only by a rule that names
//!   that range or a host name that resolves into it, never by a catch-all such as
//!   `0.0.0.0/0:443`, so the worker's own broker
//!   on 127.0.0.1:5672 stays out of reach unless listed. DNS lookups (the host's resolver)
//!   only with `dns = true`.
//! - **Variables**: named text values served through `wasi:config/store` (the SDK's
//!   `wasmq_sdk::config::get`) — only those granted to this call, never in the environment,
//!   never logged (the [`Debug`] output of [`Grants`] hides the values).
//!
//! A grant that cannot be given (a missing folder, a relative guest path) stops the call
//! before it starts with a [`GrantError`], which the worker records as the task's failure.
//!
//! Longer than 400 lines because it owns one idea, what a call may reach, with the address
//! arithmetic the network rules need; about half of it is the unit tests of rule parsing
//! and matching.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

/// What one call may reach beyond itself. `Grants::default()` = nothing (no folder, no
/// connection, no variable).
#[derive(Clone, Default)]
pub struct Grants {
    /// Host folders the task sees, each at its own guest path.
    pub dirs: Vec<DirGrant>,
    /// Outbound TCP connections the task may open.
    pub network: NetworkGrant,
    /// Variables the task may read through `wasi:config/store`, by name.
    pub variables: BTreeMap<String, String>,
    /// Values never written to the worker's log (a tenant's secrets): the guest's log
    /// records and forwarded output show `[secret]` in their place.
    pub secrets: Vec<String>,
}

/// Shows the variables' names, never their values (a `CallRequest` may be logged).
impl fmt::Debug for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grants")
            .field("dirs", &self.dirs)
            .field("network", &self.network)
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Grants {
    /// `text` with every secret value replaced by `[secret]`.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        redact(&self.secrets, text)
    }
    /// True when nothing is granted: the call runs exactly as without grants.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.network.is_empty() && self.variables.is_empty()
    }

    /// Checks that every folder grant can be given (see [`DirGrant::check`]) and that no
    /// two folders share a guest path.
    ///
    /// # Errors
    /// The first grant that cannot be given.
    pub fn check(&self) -> Result<(), GrantError> {
        for (i, dir) in self.dirs.iter().enumerate() {
            dir.check()?;
            if self.dirs[..i].iter().any(|other| other.guest == dir.guest) {
                return Err(GrantError::DuplicateGuest {
                    guest: dir.guest.clone(),
                });
            }
        }
        Ok(())
    }

    /// Gives these grants to the WASI context of one call: folders, network, name lookups.
    /// (Variables live beside the WASI context, in the call's state.)
    pub(super) fn apply(&self, wasi: &mut WasiCtxBuilder, task_id: &str) -> Result<(), GrantError> {
        // UDP is never granted; TCP and name lookups only as the grant says.
        wasi.allow_udp(false)
            .allow_tcp(!self.network.allow.is_empty())
            .allow_ip_name_lookup(self.network.dns);
        if !self.network.allow.is_empty() {
            let network = Arc::new(self.network.clone());
            let task_id: Arc<str> = Arc::from(task_id);
            wasi.socket_addr_check(move |addr, usage| {
                let (network, task_id) = (Arc::clone(&network), Arc::clone(&task_id));
                Box::pin(async move {
                    let allowed = network.permits(addr, usage).await;
                    if !allowed {
                        tracing::debug!(task_id = %task_id, %addr, usage = ?usage,
                            "the task's network grant refused a socket address");
                    }
                    allowed
                })
            });
        }
        if self.dirs.is_empty() {
            return Ok(());
        }
        self.check()?;
        for dir in &self.dirs {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            // Opens the host folder (once per call: only calls with folder grants pay).
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| GrantError::Open {
                    host: dir.host.clone(),
                    reason: format!("{e:#}"),
                })?;
        }
        Ok(())
    }
}

/// A host folder the task sees at `guest` (e.g. `/data`), read-only unless `writable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The folder on the worker's machine. It must exist and be a folder when a call
    /// starts; it comes from the operator's configuration, never from a task.
    pub host: PathBuf,
    /// Where the task sees it: an absolute path without `.` or `..` parts, e.g. `/data`.
    pub guest: String,
    /// Whether the task may create, change and remove files in it.
    pub writable: bool,
}

impl DirGrant {
    /// A read-only grant of `host` at `guest`.
    pub fn read_only(host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            guest: guest.into(),
            writable: false,
        }
    }

    /// A read-write grant of `host` at `guest`.
    pub fn writable(host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            guest: guest.into(),
            writable: true,
        }
    }

    /// Checks that the guest path is absolute and plain, and that the host folder exists
    /// and is a folder.
    ///
    /// # Errors
    /// [`GrantError::GuestPath`], [`GrantError::HostMissing`] or
    /// [`GrantError::NotADirectory`].
    pub fn check(&self) -> Result<(), GrantError> {
        check_guest_path(&self.guest)?;
        let metadata = std::fs::metadata(&self.host).map_err(|source| GrantError::HostMissing {
            host: self.host.clone(),
            source,
        })?;
        if !metadata.is_dir() {
            return Err(GrantError::NotADirectory {
                host: self.host.clone(),
            });
        }
        Ok(())
    }
}

/// An absolute guest path made of plain names: `/`, `/data`, `/srv/in`.
fn check_guest_path(guest: &str) -> Result<(), GrantError> {
    let bad = |reason: &'static str| GrantError::GuestPath {
        guest: guest.to_owned(),
        reason,
    };
    if !guest.starts_with('/') {
        return Err(bad("it must be absolute, e.g. /data"));
    }
    if guest.contains('\0') {
        return Err(bad("it contains a NUL byte"));
    }
    if guest == "/" {
        return Ok(());
    }
    if guest.ends_with('/') {
        return Err(bad("it must not end with a slash"));
    }
    for part in guest[1..].split('/') {
        match part {
            "" => return Err(bad("it has an empty part (//)")),
            "." | ".." => return Err(bad("it must not contain . or .. parts")),
            _ => {}
        }
    }
    Ok(())
}

/// Outbound TCP connections the task may open: deny-all by default.
#[derive(Debug, Clone, Default)]
pub struct NetworkGrant {
    /// The connections allowed: any one matching rule allows an address.
    pub allow: Vec<NetworkRule>,
    /// Whether the task may resolve host names (with the worker's resolver). Resolving
    /// reaches nothing by itself: a connection still needs a rule for the address.
    pub dns: bool,
}

impl NetworkGrant {
    /// Whether a TCP connection to `addr` is allowed by an address rule (host name rules
    /// need a lookup: see [`NetworkGrant::allows_resolving`]).
    pub fn allows(&self, addr: SocketAddr) -> bool {
        self.allow.iter().any(|rule| rule.allows(addr))
    }

    /// Whether a TCP connection to `addr` is allowed by any rule: an address rule, or a
    /// host name rule whose name the worker resolves (now, or within [`HOST_TTL`]) to
    /// `addr`'s address. A name that does not resolve allows nothing.
    pub async fn allows_resolving(&self, addr: SocketAddr) -> bool {
        if self.allows(addr) {
            return true;
        }
        let ip = addr.ip().to_canonical();
        for rule in &self.allow {
            if let Target::Host(name) = &rule.target
                && rule.port.is_none_or(|port| port == addr.port())
                && resolve(name).await.contains(&ip)
            {
                return true;
            }
        }
        false
    }

    /// True when it grants nothing: no rule and no name lookups.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && !self.dns
    }

    /// What the socket address check answers. wasi:sockets asks before every bind,
    /// listen, accept and connect; an outbound connect on a socket the guest did not bind
    /// first is reported as a `TcpBind` of the unspecified address with port 0 (the OS's
    /// implicit bind to an ephemeral port), then a `TcpConnect` of the remote address.
    /// Only those two steps are ever allowed: an explicit bind to 0.0.0.0:0 passes too (it
    /// is the same ephemeral bind), but a socket bound that way cannot listen, since
    /// `TcpListen` is always refused.
    pub(super) async fn permits(&self, addr: SocketAddr, usage: SocketAddrUse) -> bool {
        match usage {
            SocketAddrUse::TcpConnect => self.allows_resolving(addr).await,
            SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
            SocketAddrUse::TcpListen
            | SocketAddrUse::TcpAccept
            | SocketAddrUse::UdpBind
            | SocketAddrUse::UdpSend
            | SocketAddrUse::UdpReceive => false,
        }
    }
}

/// How long the worker trusts its lookup of a host name rule's name.
pub(crate) const HOST_TTL: Duration = Duration::from_secs(30);

/// Host names looked up for host name rules: when, and the addresses they resolved to.
type Lookups = Mutex<HashMap<String, (Instant, Arc<[IpAddr]>)>>;

/// Names looked up for host name rules: one lookup per name and [`HOST_TTL`], shared by
/// every call of the process.
fn resolved() -> &'static Lookups {
    static RESOLVED: OnceLock<Lookups> = OnceLock::new();
    RESOLVED.get_or_init(Lookups::default)
}

/// The addresses `name` resolves to with the worker's resolver (cached for [`HOST_TTL`]);
/// none when it does not resolve.
async fn resolve(name: &str) -> Arc<[IpAddr]> {
    let cache = resolved();
    if let Some((at, ips)) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
        && at.elapsed() < HOST_TTL
    {
        return Arc::clone(ips);
    }
    let lookup = name.to_owned();
    let ips: Arc<[IpAddr]> = tokio::task::spawn_blocking(move || {
        (lookup.as_str(), 0)
            .to_socket_addrs()
            .map(|addrs| addrs.map(|a| a.ip().to_canonical()).collect::<Vec<_>>())
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default()
    .into();
    if ips.is_empty() {
        tracing::debug!(host = name, "a host name rule's name does not resolve");
    }
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    // Bounded: rules name few hosts; a runaway set starts over.
    if cache.len() >= 1024 {
        cache.clear();
    }
    cache.insert(name.to_owned(), (Instant::now(), Arc::clone(&ips)));
    ips
}

/// Whether `name` is a DNS host name: dot-separated labels of ASCII letters, digits and
/// inner hyphens, at most 63 bytes each and 253 in all, the last not all digits.
fn is_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    !name.is_empty()
        && name.len() <= 253
        && labels.iter().all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && labels
            .last()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// What a rule names: an IP network, or a host name the worker resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// An IP network.
    Net {
        /// The network.
        net: IpNet,
        /// The whole network lies inside a special range: the rule names it.
        names_special: bool,
    },
    /// A host name, lower case.
    Host(String),
}

/// One allow rule: an IP network or a host name, and a port (or any port), parsed from
/// text: `127.0.0.1:6380`, `10.0.0.0/8:5432`, `[::1]:80`, `[fc00::/7]:*`,
/// `192.168.1.5:*`, `0.0.0.0/0:443`, `api.example.com:443`, `db.internal:*`.
///
/// A host name rule allows the addresses the worker's resolver gives for the name when the
/// guest connects (looked up by the worker, cached for [`HOST_TTL`]), including special
/// ones: naming a host is naming what it resolves to. The guest's own lookup (granted by
/// `dns`) decides nothing: it may connect by address, and only an address the worker's
/// lookup returned passes. Grant names whose DNS the operator trusts.
///
/// A rule allows a connection when the address is in its network and the port matches,
/// with one exception: an address in a special range — loopback (127/8, ::1), private
/// (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16, fe80::/10), CGNAT
/// (100.64/10), "this network" (0/8, ::), multicast (224/4, ff00::/8), reserved
/// (240/4, broadcast), and IPv6 forms that embed an IPv4 address (::/96, NAT64
/// 64:ff9b::/96 and 64:ff9b:1::/48) — is matched only by a rule whose whole network lies
/// inside one of those ranges. So `0.0.0.0/0:443` reaches the public internet but not the
/// broker on 127.0.0.1, while `127.0.0.1:5672` or `10.0.0.0/8:*` reach what they name.
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched as the IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRule {
    /// The network or host.
    target: Target,
    /// The port, or any.
    port: Option<u16>,
}

impl NetworkRule {
    /// A rule for the network `ip/prefix_len` and `port` (`None`: any port).
    ///
    /// # Errors
    /// [`GrantError::Rule`] when the prefix is too long for the address family, the address
    /// has bits set beyond the prefix, it is an IPv4-mapped IPv6 address, or the port is 0.
    pub fn new(ip: IpAddr, prefix_len: u8, port: Option<u16>) -> Result<Self, GrantError> {
        let text = || match port {
            Some(port) => format!("{ip}/{prefix_len}:{port}"),
            None => format!("{ip}/{prefix_len}:*"),
        };
        let bad = |reason: String| GrantError::Rule {
            rule: text(),
            reason,
        };
        if port == Some(0) {
            return Err(bad(
                "port 0 is not a destination; write a port or *".to_owned()
            ));
        }
        if let IpAddr::V6(v6) = ip
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(bad(format!(
                "{ip} is an IPv4-mapped address: write the IPv4 address"
            )));
        }
        let max = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix_len > max {
            return Err(bad(format!(
                "the prefix /{prefix_len} is longer than {max} bits"
            )));
        }
        let net = IpNet {
            addr: ip,
            prefix: prefix_len,
        };
        if net.masked() != ip {
            return Err(bad(format!(
                "{ip}/{prefix_len} has bits set beyond the prefix: write {}/{prefix_len}",
                net.masked()
            )));
        }
        let names_special = SPECIAL.iter().any(|range| net.within(&range.net()));
        Ok(Self {
            target: Target::Net { net, names_special },
            port,
        })
    }

    /// A rule for the host `name` and `port` (`None`: any port).
    ///
    /// # Errors
    /// [`GrantError::Rule`] when `name` is not a DNS host name or the port is 0.
    pub fn host(name: &str, port: Option<u16>) -> Result<Self, GrantError> {
        let bad = |reason: &str| GrantError::Rule {
            rule: format!("{name}:{}", port.map_or("*".to_owned(), |p| p.to_string())),
            reason: reason.to_owned(),
        };
        if port == Some(0) {
            return Err(bad("port 0 is not a destination; write a port or *"));
        }
        if !is_host_name(name) {
            return Err(bad(
                "not an IP address, a CIDR network or a host name (letters, digits, - and .)",
            ));
        }
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        Ok(Self {
            target: Target::Host(name),
            port,
        })
    }

    /// The network's address; none for a host name rule.
    pub fn ip(&self) -> Option<IpAddr> {
        match &self.target {
            Target::Net { net, .. } => Some(net.addr),
            Target::Host(_) => None,
        }
    }

    /// The network's prefix length (32 or 128 for one address); none for a host name rule.
    pub fn prefix_len(&self) -> Option<u8> {
        match &self.target {
            Target::Net { net, .. } => Some(net.prefix),
            Target::Host(_) => None,
        }
    }

    /// The host name of a host name rule (lower case).
    pub fn host_name(&self) -> Option<&str> {
        match &self.target {
            Target::Host(name) => Some(name),
            Target::Net { .. } => None,
        }
    }

    /// The port, or `None` for any port.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether this address rule allows a TCP connection to `addr` (see [`NetworkRule`]
    /// for the special ranges a catch-all never matches). A host name rule answers false
    /// here: it needs a lookup ([`NetworkGrant::allows_resolving`]).
    pub fn allows(&self, addr: SocketAddr) -> bool {
        if self.port.is_some_and(|port| port != addr.port()) {
            return false;
        }
        let ip = addr.ip().to_canonical();
        match &self.target {
            Target::Net { net, names_special } => {
                net.contains(ip) && (*names_special || !is_special(ip))
            }
            Target::Host(_) => false,
        }
    }
}

impl fmt::Display for NetworkRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Host(name) => f.write_str(name)?,
            Target::Net { net, .. } => {
                let full = net.prefix == net.max_prefix();
                match (net.addr, full) {
                    (IpAddr::V4(ip), true) => write!(f, "{ip}")?,
                    (IpAddr::V4(ip), false) => write!(f, "{ip}/{}", net.prefix)?,
                    (IpAddr::V6(ip), true) => write!(f, "[{ip}]")?,
                    (IpAddr::V6(ip), false) => write!(f, "[{ip}/{}]", net.prefix)?,
                }
            }
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => f.write_str(":*"),
        }
    }
}

impl FromStr for NetworkRule {
    type Err = GrantError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| GrantError::Rule {
            rule: text.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = text.trim();
        // `[v6]:port`, `[v6/len]:port` or `[v6]/len:port`; else `v4:port`, `v4/len:port`.
        let (network, port) = if let Some(rest) = trimmed.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| bad("an opening [ without its closing ]"))?;
            let (prefix, port) = after
                .split_once(':')
                .ok_or_else(|| bad("no port: write [::1]:80, or [::1]:* for any port"))?;
            if prefix.is_empty() {
                (inside.to_owned(), port)
            } else if prefix.starts_with('/') && !inside.contains('/') {
                (format!("{inside}{prefix}"), port)
            } else {
                return Err(bad("unexpected text between ] and the port"));
            }
        } else {
            let (network, port) = trimmed
                .rsplit_once(':')
                .ok_or_else(|| bad("no port: write 10.0.0.1:80, or 10.0.0.1:* for any port"))?;
            if network.contains(':') {
                return Err(bad(
                    "an IPv6 address goes in brackets: [::1]:80 or [fc00::/7]:*",
                ));
            }
            (network.to_owned(), port)
        };
        let (ip, prefix) = match network.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (network.as_str(), None),
        };
        let port_of = |port: &str| match port {
            "*" => Ok(None),
            port => port
                .parse::<u16>()
                .map(Some)
                .map_err(|_| bad("the port is not a number from 1 to 65535 or *")),
        };
        let ip: IpAddr = match ip.parse() {
            Ok(ip) => ip,
            Err(_) if !trimmed.starts_with('[') && ip.bytes().any(|b| b.is_ascii_alphabetic()) => {
                if prefix.is_some() {
                    return Err(bad("a host name takes no /prefix"));
                }
                return NetworkRule::host(ip, port_of(port)?).map_err(|error| match error {
                    GrantError::Rule { reason, .. } => GrantError::Rule {
                        rule: text.to_owned(),
                        reason,
                    },
                    other => other,
                });
            }
            Err(_) => return Err(bad("not an IP address")),
        };
        let prefix_len = match prefix {
            None => match ip {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
            Some(prefix) => prefix
                .parse::<u8>()
                .map_err(|_| bad("the prefix length after / is not a number"))?,
        };
        let port = port_of(port)?;
        NetworkRule::new(ip, prefix_len, port).map_err(|error| match error {
            GrantError::Rule { reason, .. } => GrantError::Rule {
                rule: text.to_owned(),
                reason,
            },
            other => other,
        })
    }
}

impl TryFrom<String> for NetworkRule {
    type Error = GrantError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// Why a grant cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// A network rule's text does not parse.
    #[error("bad network rule {rule:?}: {reason}")]
    Rule {
        /// The rule as written.
        rule: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A granted host folder does not exist or cannot be read.
    #[error("the granted folder {} cannot be used", host.display())]
    HostMissing {
        /// The host folder.
        host: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A granted host path is not a folder.
    #[error("the granted path {} is not a folder", host.display())]
    NotADirectory {
        /// The host path.
        host: PathBuf,
    },
    /// A guest path is not an absolute, plain path.
    #[error("the guest path {guest:?} of a folder grant is not valid: {reason}")]
    GuestPath {
        /// The guest path as written.
        guest: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two folder grants of one call share a guest path.
    #[error("two folders are granted at the same guest path {guest:?}")]
    DuplicateGuest {
        /// The guest path.
        guest: String,
    },
    /// wasmtime could not open a granted folder.
    #[error("cannot open the granted folder {}: {reason}", host.display())]
    Open {
        /// The host folder.
        host: PathBuf,
        /// wasmtime's explanation.
        reason: String,
    },
}

/// An IP network: an address and a prefix length, host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    fn max_prefix(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// The address with every bit beyond the prefix cleared.
    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from_bits(ip.to_bits() & mask_u32(self.prefix))),
            IpAddr::V6(ip) => {
                IpAddr::V6(Ipv6Addr::from_bits(ip.to_bits() & mask_u128(self.prefix)))
            }
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_u32(self.prefix);
                net.to_bits() & mask == ip.to_bits() & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_u128(self.prefix);
                net.to_bits() & mask == ip.to_bits() & mask
            }
            _ => false,
        }
    }

    /// Whether every address of `self` is in `other`.
    fn within(&self, other: &IpNet) -> bool {
        self.prefix >= other.prefix && other.contains(self.addr)
    }
}

fn mask_u32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

fn mask_u128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0)
}

/// A special range, as text-free constants.
struct Special {
    addr: IpAddr,
    prefix: u8,
}

impl Special {
    const fn v4(a: u8, b: u8, prefix: u8) -> Self {
        Self {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, 0, 0)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 3], prefix: u8) -> Self {
        let [a, b, c] = segments;
        Self {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0)),
            prefix,
        }
    }

    fn net(&self) -> IpNet {
        IpNet {
            addr: self.addr,
            prefix: self.prefix,
        }
    }
}

/// The ranges a catch-all rule never reaches (see [`NetworkRule`]).
const SPECIAL: &[Special] = &[
    Special::v4(0, 0, 8),  // "this network", incl. 0.0.0.0 (reaches the host itself)
    Special::v4(10, 0, 8), // private
    Special::v4(100, 64, 10), // CGNAT
    Special::v4(127, 0, 8), // loopback
    Special::v4(169, 254, 16), // link-local (incl. cloud metadata at 169.254.169.254)
    Special::v4(172, 16, 12), // private
    Special::v4(192, 168, 16), // private
    Special::v4(224, 0, 4), // multicast
    Special::v4(240, 0, 4), // reserved, incl. 255.255.255.255
    Special::v6([0, 0, 0], 96), // ::, ::1 and the IPv4-compatible ::a.b.c.d
    Special::v6([0, 0, 0xffff], 96), // IPv4-mapped (matched as IPv4; listed for rules)
    Special::v6([0x64, 0xff9b, 0], 96), // NAT64 to any IPv4, private ones included
    Special::v6([0x64, 0xff9b, 1], 48), // local-use NAT64
    Special::v6([0xfc00, 0, 0], 7), // unique local (private)
    Special::v6([0xfe80, 0, 0], 10), // link-local
    Special::v6([0xfec0, 0, 0], 10), // site-local (deprecated, still private)
    Special::v6([0xff00, 0, 0], 8), // multicast
];

/// Whether `ip` (canonical: IPv4-mapped addresses already turned into IPv4) is in a
/// special range.
fn is_special(ip: IpAddr) -> bool {
    SPECIAL.iter().any(|range| range.net().contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> NetworkRule {
        text.parse()
            .unwrap_or_else(|e| panic!("{text} does not parse: {e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn rules_parse_from_their_documented_forms() {
        let r = rule("127.0.0.1:6380");
        assert_eq!(
            (r.ip(), r.prefix_len(), r.port()),
            (Some("127.0.0.1".parse().unwrap()), Some(32), Some(6380))
        );
        let r = rule("10.0.0.0/8:5432");
        assert_eq!((r.prefix_len(), r.port()), (Some(8), Some(5432)));
        let r = rule("[::1]:80");
        assert_eq!(
            (r.ip(), r.prefix_len(), r.port()),
            (Some("::1".parse().unwrap()), Some(128), Some(80))
        );
        assert_eq!(rule("192.168.1.5:*").port(), None);
        assert_eq!(rule("0.0.0.0/0:443").prefix_len(), Some(0));
        assert_eq!(rule("[fc00::/7]:*").prefix_len(), Some(7));
        assert_eq!(rule("[fc00::]/7:*").prefix_len(), Some(7));
        assert_eq!(rule(" [::]/0:443 ").prefix_len(), Some(0));
        // Display writes the canonical text back, which parses to the same rule.
        for text in [
            "127.0.0.1:6380",
            "10.0.0.0/8:5432",
            "[::1]:80",
            "192.168.1.5:*",
            "0.0.0.0/0:443",
            "[fc00::/7]:*",
        ] {
            assert_eq!(rule(text).to_string(), text);
            assert_eq!(rule(&rule(text).to_string()), rule(text));
        }
        // Host names, lower-cased, with a port or any.
        let r = rule("API.Example.com:443");
        assert_eq!(
            (r.host_name(), r.ip(), r.port()),
            (Some("api.example.com"), None, Some(443))
        );
        assert_eq!(rule("localhost:*").host_name(), Some("localhost"));
        assert_eq!(
            rule("db-1.internal.:5432").to_string(),
            "db-1.internal:5432"
        );
    }

    #[tokio::test]
    async fn a_host_name_rule_allows_what_the_worker_resolves_the_name_to() {
        let grant = NetworkGrant {
            allow: vec![rule("localhost:6380")],
            dns: false,
        };
        // A host name rule never matches without a lookup.
        assert!(!grant.allows(addr("127.0.0.1:6380")));
        // localhost resolves to loopback: the rule names it, so it is reached, on its
        // port only.
        assert!(grant.allows_resolving(addr("127.0.0.1:6380")).await);
        assert!(!grant.allows_resolving(addr("127.0.0.1:6381")).await);
        assert!(!grant.allows_resolving(addr("10.0.0.1:6380")).await);
        // (A name that does not resolve is not tried here: its lookup would leave this
        // machine.)
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, fragment) in [
            ("127.0.0.1", "no port"),
            (
                "exa_mple.com:443",
                "not an IP address, a CIDR network or a host name",
            ),
            ("-bad.example.com:443", "host name"),
            ("example.com/24:443", "a host name takes no /prefix"),
            ("example.com:0", "port 0"),
            ("example.com:https", "1 to 65535"),
            ("::1:80", "goes in brackets"),
            ("[::1]", "no port"),
            ("[::1:80", "without its closing ]"),
            (
                "10.0.0.1/8:80",
                "bits set beyond the prefix: write 10.0.0.0/8",
            ),
            ("10.0.0.0/33:80", "longer than 32 bits"),
            ("[::/129]:80", "longer than 128 bits"),
            ("10.0.0.0/x:80", "prefix length"),
            ("10.0.0.1:0", "port 0"),
            ("10.0.0.1:65536", "1 to 65535"),
            ("10.0.0.1:http", "1 to 65535"),
            ("[::ffff:127.0.0.1]:80", "IPv4-mapped"),
            ("300.0.0.1:80", "not an IP address"),
            ("[::1]x:80", "between ]"),
        ] {
            let error = text.parse::<NetworkRule>().unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, GrantError::Rule { .. }),
                "{text}: {message}"
            );
            assert!(message.contains(fragment), "{text}: {message}");
            assert!(message.contains(&format!("{text:?}")), "{text}: {message}");
        }
    }

    #[test]
    fn a_rule_matches_its_network_and_port() {
        let r = rule("127.0.0.1:6380");
        assert!(r.allows(addr("127.0.0.1:6380")));
        assert!(!r.allows(addr("127.0.0.1:6381")));
        assert!(!r.allows(addr("127.0.0.2:6380")));
        // IPv4-mapped IPv6 is the same destination.
        assert!(r.allows(addr("[::ffff:127.0.0.1]:6380")));

        let r = rule("10.0.0.0/8:5432");
        assert!(r.allows(addr("10.1.2.3:5432")));
        assert!(r.allows(addr("10.255.255.255:5432")));
        assert!(!r.allows(addr("11.0.0.1:5432")));
        assert!(!r.allows(addr("10.1.2.3:5433")));

        let r = rule("192.168.1.5:*");
        assert!(r.allows(addr("192.168.1.5:1")));
        assert!(r.allows(addr("192.168.1.5:65535")));
        assert!(!r.allows(addr("192.168.1.6:80")));

        let r = rule("[::1]:80");
        assert!(r.allows(addr("[::1]:80")));
        assert!(!r.allows(addr("127.0.0.1:80")), "families do not mix");

        let r = rule("[2001:db8::/32]:443");
        assert!(r.allows(addr("[2001:db8::1]:443")));
        assert!(!r.allows(addr("[2001:db9::1]:443")));
    }

    #[test]
    fn a_catch_all_never_reaches_special_addresses() {
        let v4 = rule("0.0.0.0/0:*");
        let v6 = rule("[::/0]:*");
        assert!(v4.allows(addr("93.184.216.34:443")), "a public address");
        assert!(v6.allows(addr("[2606:2800:220:1::1]:443")));
        for special in [
            "127.0.0.1:5672",
            "127.255.0.1:80",
            "0.0.0.0:5672",
            "0.1.2.3:80",
            "10.0.0.1:80",
            "172.16.0.1:80",
            "172.31.255.255:80",
            "192.168.1.1:80",
            "169.254.169.254:80",
            "100.64.0.1:80",
            "100.127.255.255:80",
            "224.0.0.1:80",
            "239.255.255.250:1900",
            "240.0.0.1:80",
            "255.255.255.255:80",
            "[::ffff:127.0.0.1]:5672",
            "[::ffff:10.0.0.1]:80",
        ] {
            assert!(!v4.allows(addr(special)), "0.0.0.0/0 reached {special}");
        }
        for special in [
            "[::1]:80",
            "[::]:80",
            "[::7f00:1]:80",
            "[fc00::1]:80",
            "[fd12:3456::1]:80",
            "[fe80::1]:80",
            "[fec0::1]:80",
            "[ff02::1]:80",
            "[64:ff9b::a00:1]:80",
            "[64:ff9b:1::1]:80",
        ] {
            assert!(!v6.allows(addr(special)), "::/0 reached {special}");
        }
        // Just outside the special ranges.
        for public in [
            "172.32.0.1:80",
            "100.128.0.1:80",
            "11.0.0.1:80",
            "223.0.0.1:80",
        ] {
            assert!(v4.allows(addr(public)), "{public}");
        }
        // Wide rules that merely contain a special range do not name it either.
        assert!(!rule("96.0.0.0/3:*").allows(addr("100.64.0.1:80")));
        assert!(!rule("100.0.0.0/8:*").allows(addr("100.64.0.1:80")));
        assert!(rule("100.0.0.0/8:*").allows(addr("100.1.0.1:80")));
    }

    #[test]
    fn a_rule_that_names_a_special_range_reaches_it() {
        assert!(rule("127.0.0.1:5672").allows(addr("127.0.0.1:5672")));
        assert!(rule("127.0.0.0/8:*").allows(addr("127.0.0.1:5672")));
        assert!(rule("10.0.0.0/8:5432").allows(addr("10.9.9.9:5432")));
        assert!(rule("10.1.0.0/16:*").allows(addr("10.1.2.3:80")));
        assert!(rule("[fc00::/7]:*").allows(addr("[fd00::1]:80")));
        assert!(rule("[::1]:80").allows(addr("[::1]:80")));
        assert!(rule("169.254.169.254:80").allows(addr("169.254.169.254:80")));
        // Naming one special range reaches only that range.
        assert!(!rule("10.0.0.0/8:*").allows(addr("127.0.0.1:80")));
    }

    #[tokio::test]
    async fn the_grant_allows_only_outbound_connects() {
        let grant = NetworkGrant {
            allow: vec![rule("127.0.0.1:6380"), rule("0.0.0.0/0:443")],
            dns: false,
        };
        assert!(!grant.is_empty());
        assert!(grant.allows(addr("127.0.0.1:6380")));
        assert!(grant.allows(addr("1.1.1.1:443")));
        assert!(!grant.allows(addr("127.0.0.1:5672")), "the broker");
        assert!(!grant.allows(addr("127.0.0.1:443")));
        let connect = SocketAddrUse::TcpConnect;
        assert!(grant.permits(addr("127.0.0.1:6380"), connect).await);
        assert!(!grant.permits(addr("127.0.0.1:5672"), connect).await);
        // The implicit bind an outbound connect reports, and nothing else.
        assert!(
            grant
                .permits(addr("0.0.0.0:0"), SocketAddrUse::TcpBind)
                .await
        );
        assert!(grant.permits(addr("[::]:0"), SocketAddrUse::TcpBind).await);
        assert!(
            !grant
                .permits(addr("0.0.0.0:6380"), SocketAddrUse::TcpBind)
                .await
        );
        assert!(
            !grant
                .permits(addr("127.0.0.1:6380"), SocketAddrUse::TcpBind)
                .await
        );
        assert!(
            !grant
                .permits(addr("127.0.0.1:0"), SocketAddrUse::TcpBind)
                .await
        );
        for usage in [
            SocketAddrUse::TcpListen,
            SocketAddrUse::TcpAccept,
            SocketAddrUse::UdpBind,
            SocketAddrUse::UdpSend,
            SocketAddrUse::UdpReceive,
        ] {
            for a in ["0.0.0.0:0", "127.0.0.1:6380", "1.1.1.1:443"] {
                assert!(!grant.permits(addr(a), usage).await, "{usage:?} {a}");
            }
        }
        assert!(NetworkGrant::default().is_empty());
        assert!(!NetworkGrant::default().allows(addr("1.1.1.1:443")));
        let dns_only = NetworkGrant {
            allow: Vec::new(),
            dns: true,
        };
        assert!(!dns_only.is_empty());
        assert!(!dns_only.allows(addr("1.1.1.1:443")));
    }

    #[test]
    fn folder_grants_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.txt");
        std::fs::write(&file, "x").unwrap();
        assert!(DirGrant::read_only(dir.path(), "/data").check().is_ok());
        assert!(DirGrant::writable(dir.path(), "/").check().is_ok());
        assert!(DirGrant::read_only(dir.path(), "/srv/in").check().is_ok());
        let error = DirGrant::read_only(dir.path().join("missing"), "/data")
            .check()
            .unwrap_err();
        assert!(matches!(error, GrantError::HostMissing { .. }), "{error}");
        let error = DirGrant::read_only(&file, "/data").check().unwrap_err();
        assert!(matches!(error, GrantError::NotADirectory { .. }), "{error}");
        assert!(error.to_string().contains("is not a folder"), "{error}");
        for (guest, fragment) in [
            ("data", "absolute"),
            ("", "absolute"),
            ("/data/", "slash"),
            ("/data/../etc", ".."),
            ("/./data", ". or .."),
            ("//data", "empty part"),
            ("/da\0ta", "NUL"),
        ] {
            let error = DirGrant::read_only(dir.path(), guest).check().unwrap_err();
            assert!(matches!(error, GrantError::GuestPath { .. }), "{guest:?}");
            assert!(error.to_string().contains(fragment), "{guest:?}: {error}");
        }
        let twice = Grants {
            dirs: vec![
                DirGrant::read_only(dir.path(), "/data"),
                DirGrant::writable(dir.path(), "/data"),
            ],
            ..Grants::default()
        };
        assert!(matches!(
            twice.check().unwrap_err(),
            GrantError::DuplicateGuest { .. }
        ));
    }

    #[test]
    fn debug_output_hides_variable_values() {
        let grants = Grants {
            variables: [("API_TOKEN".to_owned(), "s3cr3t-value".to_owned())].into(),
            ..Grants::default()
        };
        let shown = format!("{grants:?}");
        assert!(shown.contains("API_TOKEN"), "{shown}");
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(!grants.is_empty());
        assert!(Grants::default().is_empty());
    }
}

/// `text` with every value of `secrets` replaced by `[secret]` (empty values are ignored).
pub fn redact<'a>(secrets: &[String], text: &'a str) -> std::borrow::Cow<'a, str> {
    let mut text = std::borrow::Cow::Borrowed(text);
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if text.contains(secret.as_str()) {
            text = std::borrow::Cow::Owned(text.replace(secret.as_str(), "[secret]"));
        }
    }
    text
}

#[cfg(test)]
mod redaction_tests {
    use super::redact;

    #[test]
    fn secrets_are_replaced_wherever_they_appear() {
        let secrets = vec!["s3cret".to_owned(), String::new()];
        assert_eq!(
            redact(&secrets, "token=s3cret; again s3cret"),
            "token=[secret]; again [secret]"
        );
        assert_eq!(redact(&secrets, "nothing here"), "nothing here");
    }
}
