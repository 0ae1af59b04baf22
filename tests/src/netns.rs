//! A test network of network namespaces, one per node, for faults between nodes
//! (partitions, flapping links) that signals on processes cannot make.
//!
//! Each node's namespace holds its address (`10.231.K.10+i`, on its loopback) and a veth
//! link to every other node's namespace and one to the test's own namespace, with a host
//! route per link: nothing is bridged or forwarded, so the host's firewall (Docker sets
//! FORWARD to DROP) never sees the traffic. A partition drops a link's packets with
//! iptables inside the two namespaces (silently, like a switch that died: TCP sees no
//! reset); the test's own links to the nodes are never cut, so clients stay connected.
//! Everything is removed when the [`Testnet`] is dropped. Needs root and iproute2.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

/// Why a test network cannot be made here (not root, no `ip`), for the skip message.
pub fn unavailable() -> Option<String> {
    // `id -u` rather than a libc dependency.
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().map_or(true, |o| !o.status.success()) {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Namespaces and links for `n` nodes; removed on drop.
pub struct Testnet {
    /// The subnet's third octet, unique per live test network.
    k: u8,
    n: usize,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(out.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

impl Testnet {
    /// Makes the namespaces and links for `n` nodes (at most 9).
    pub fn create(n: usize) -> anyhow::Result<Testnet> {
        anyhow::ensure!((1..10).contains(&n), "1 to 9 nodes");
        // A subnet no live test network uses (the root side's address and the first
        // namespace are the markers); tests of one process take turns choosing and each
        // starts the search where the last one stopped.
        static CHOOSING: std::sync::Mutex<u32> = std::sync::Mutex::new(u32::MAX);
        let mut next = CHOOSING.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if *next == u32::MAX {
            *next = std::process::id() % 200;
        }
        let existing = String::from_utf8_lossy(&Command::new("ip").args(["-4", "addr", "show", "dev", "lo"]).output()?.stdout).into_owned();
        let start = *next;
        let k = (0..200u32)
            .map(|i| (10 + (start + i) % 200) as u8)
            .find(|k| !existing.contains(&format!("10.231.{k}.1/32")) && !std::path::Path::new(&format!("/run/netns/rq{k}n0")).exists())
            .ok_or_else(|| anyhow::anyhow!("no free test subnet"))?;
        *next = u32::from(k) - 10 + 1;
        let net = Testnet { k, n };
        net.build()?;
        Ok(net)
    }

    fn build(&self) -> anyhow::Result<()> {
        let k = self.k;
        let root = self.root_ip().to_string();
        run(&["ip", "addr", "add", &format!("{root}/32"), "dev", "lo"])?;
        for i in 0..self.n {
            let ns = self.namespace(i);
            let ip = self.ip(i).to_string();
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
            // The test's link to node i.
            let host_side = format!("rq{k}h{i}");
            run(&["ip", "link", "add", &host_side, "type", "veth", "peer", "name", "host", "netns", &ns])?;
            run(&["ip", "link", "set", &host_side, "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "host", "up"])?;
            run(&["ip", "route", "add", &format!("{ip}/32"), "dev", &host_side, "src", &root])?;
            run(&["ip", "-n", &ns, "route", "add", &format!("{root}/32"), "dev", "host", "src", &ip])?;
        }
        for i in 0..self.n {
            for j in i + 1..self.n {
                let (a, b) = (self.link(i, j), self.link(j, i));
                let (ns_a, ns_b) = (self.namespace(i), self.namespace(j));
                run(&["ip", "link", "add", &a, "netns", &ns_a, "type", "veth", "peer", "name", &b, "netns", &ns_b])?;
                run(&["ip", "-n", &ns_a, "link", "set", &a, "up"])?;
                run(&["ip", "-n", &ns_b, "link", "set", &b, "up"])?;
                let (ip_a, ip_b) = (self.ip(i).to_string(), self.ip(j).to_string());
                run(&["ip", "-n", &ns_a, "route", "add", &format!("{ip_b}/32"), "dev", &a, "src", &ip_a])?;
                run(&["ip", "-n", &ns_b, "route", "add", &format!("{ip_a}/32"), "dev", &b, "src", &ip_b])?;
            }
        }
        Ok(())
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: usize) -> String {
        format!("rq{}n{i}", self.k)
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.k, 10 + i as u8))
    }

    /// The test's own address on the links to the nodes.
    pub fn root_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 231, self.k, 1))
    }

    /// The name, inside node `i`'s namespace, of its link to node `j`.
    fn link(&self, i: usize, j: usize) -> String {
        format!("rq{}p{i}{j}", self.k)
    }

    fn rules(&self, i: usize, j: usize, action: &str) -> anyhow::Result<()> {
        for (from, to) in [(i, j), (j, i)] {
            let ns = self.namespace(from);
            let link = self.link(from, to);
            run(&["ip", "netns", "exec", &ns, "iptables", action, "INPUT", "-i", &link, "-j", "DROP"])?;
            run(&["ip", "netns", "exec", &ns, "iptables", action, "OUTPUT", "-o", &link, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Drops every packet between nodes `i` and `j`, both ways.
    pub fn cut(&self, i: usize, j: usize) -> anyhow::Result<()> {
        self.rules(i, j, "-I")
    }

    /// Lets packets between nodes `i` and `j` through again.
    pub fn heal(&self, i: usize, j: usize) -> anyhow::Result<()> {
        self.rules(i, j, "-D")
    }

    /// Cuts node `i` off from every other node (its clients keep their links).
    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        (0..self.n).filter(|j| *j != i).try_for_each(|j| self.cut(i, j))
    }

    /// Undoes [`Testnet::isolate`].
    pub fn rejoin(&self, i: usize) -> anyhow::Result<()> {
        (0..self.n).filter(|j| *j != i).try_for_each(|j| self.heal(i, j))
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        for i in 0..self.n {
            let _ = run(&["ip", "netns", "del", &self.namespace(i)]);
        }
        let _ = run(&["ip", "addr", "del", &format!("{}/32", self.root_ip()), "dev", "lo"]);
    }
}
