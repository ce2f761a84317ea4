//! The DHCP server of the user network: every client gets [`frame::GUEST`], the gateway
//! as its router and [`frame::DNS`] as its name server. One guest per network, so there
//! is no pool: a DISCOVER is answered with an OFFER and a REQUEST with an ACK (or a NAK
//! when it asks for another address).

use crate::frame::{DNS, GATEWAY, GUEST, NETMASK};
use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, Ipv4Address};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// Lease time in seconds: long, as the address never changes.
const LEASE_SECS: u32 = 86_400;

/// The reply to one client message (a UDP payload), or `None` when it needs none or
/// does not parse.
pub fn reply(request: &[u8]) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(request).ok()?;
    let req = DhcpRepr::parse(&packet).ok()?;
    let message_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            // A renewing client names its address in ciaddr instead of option 50.
            let asked = req.requested_ip.unwrap_or(req.client_ip);
            if asked.is_unspecified() || asked == GUEST {
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        _ => return None,
    };
    let nak = message_type == DhcpMessageType::Nak;
    let mut dns_servers = heapless::Vec::new();
    if !nak {
        let _ = dns_servers.push(DNS);
    }
    let repr = DhcpRepr {
        message_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: if nak { Ipv4Address::UNSPECIFIED } else { GUEST },
        server_ip: GATEWAY,
        router: (!nak).then_some(GATEWAY),
        subnet_mask: (!nak).then_some(NETMASK),
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(GATEWAY),
        parameter_request_list: None,
        dns_servers: (!nak).then_some(dns_servers),
        max_size: None,
        lease_duration: (!nak).then_some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut out = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut out[..]))
        .ok()?;
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::EthernetAddress;

    /// The guest's MAC address in these tests (and tap.rs's).
    pub(crate) const MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    /// A DHCP message from the guest (`MAC`), as a UDP payload.
    pub(crate) fn client(
        message_type: DhcpMessageType,
        requested_ip: Option<Ipv4Address>,
    ) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: MAC,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: Ipv4Address::UNSPECIFIED,
            server_ip: Ipv4Address::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: false,
            requested_ip,
            client_identifier: Some(MAC),
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6]),
            dns_servers: None,
            max_size: Some(576),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut out = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut out[..]))
            .unwrap();
        out
    }

    #[test]
    fn discover_gets_an_offer_of_the_guest_address_router_and_dns() {
        let bytes = reply(&client(DhcpMessageType::Discover, None)).unwrap();
        let packet = DhcpPacket::new_checked(&bytes[..]).unwrap();
        let offer = DhcpRepr::parse(&packet).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        assert_eq!(offer.transaction_id, 0x1234_5678);
        assert_eq!(offer.your_ip, GUEST);
        assert_eq!(offer.router, Some(GATEWAY));
        assert_eq!(offer.subnet_mask, Some(NETMASK));
        assert_eq!(offer.server_identifier, Some(GATEWAY));
        assert_eq!(offer.dns_servers.unwrap().as_slice(), [DNS]);
        assert_eq!(offer.client_hardware_address, MAC);
    }

    #[test]
    fn request_for_the_guest_address_is_acked_and_another_is_refused() {
        let ack = reply(&client(DhcpMessageType::Request, Some(GUEST))).unwrap();
        let packet = DhcpPacket::new_checked(&ack[..]).unwrap();
        assert_eq!(
            DhcpRepr::parse(&packet).unwrap().message_type,
            DhcpMessageType::Ack
        );
        let other = Ipv4Address::new(10, 0, 2, 16);
        let bytes = reply(&client(DhcpMessageType::Request, Some(other))).unwrap();
        let packet = DhcpPacket::new_checked(&bytes[..]).unwrap();
        let nak = DhcpRepr::parse(&packet).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        assert_eq!(nak.your_ip, Ipv4Address::UNSPECIFIED);
    }

    #[test]
    fn garbage_and_server_messages_get_no_reply() {
        assert!(reply(&[]).is_none());
        assert!(reply(&[0xff; 300]).is_none());
        let mut truncated = client(DhcpMessageType::Discover, None);
        truncated.truncate(200);
        assert!(reply(&truncated).is_none());
        assert!(reply(&client(DhcpMessageType::Offer, None)).is_none());
    }
}
