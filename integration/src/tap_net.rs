//! What a tap network (`microagent_vhost_net::netns`) leaves on the host, for tests
//! that check it is all gone.

use microagent_vhost_net::netns::TapNetwork;
use std::process::Command;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every trace of `net` on the host: its namespace, its host veth, and NAT rules that
/// name it (by comment) or its /30 without naming another. Other tests make networks of their own meanwhile,
/// so a before/after comparison of the whole host would race; this looks for one.
pub fn traces(net: &TapNetwork) -> Vec<String> {
    let host_veth = net.host_veth();
    let subnet = format!("{}/30", net.host_addr()).replace(".1/30", ".0/30");
    let comment = format!("microagent:{}\"", net.netns);
    let mut found = Vec::new();
    for (what, text) in [
        ("netns", run("ip", &["netns", "list"])),
        ("link", run("ip", &["-o", "link", "show"])),
        ("nat", run("iptables", &["-w", "-t", "nat", "-S"])),
    ] {
        for line in text.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            // An index (veth name, /30) is reused once freed: a line naming another
            // network's namespace or comment is not a trace of this one.
            let link = (line.contains(&format!(" {host_veth}:"))
                || line.contains(&format!(" {host_veth}@")))
                && (!line.contains("link-netns ")
                    || line.contains(&format!("link-netns {}", net.netns)));
            let nat =
                line.contains(&comment) || (line.contains(&subnet) && !line.contains("--comment"));
            let mentions = first == net.netns || link || nat;
            if mentions {
                found.push(format!("{what}: {line}"));
            }
        }
    }
    found
}

/// Asserts that `traces` shows all three kinds (the network is really there).
pub fn assert_present(net: &TapNetwork) {
    let found = traces(net);
    for kind in ["netns: ", "link: ", "nat: "] {
        assert!(
            found.iter().any(|t| t.starts_with(kind)),
            "no {kind}in {found:?}"
        );
    }
}
