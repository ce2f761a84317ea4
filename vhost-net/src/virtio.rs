//! The virtio-net device's side of the rings: the header in front of every frame and
//! the config space (virtio 1.2, 5.1). No offloads are offered, so headers from the
//! guest carry nothing the daemon needs and headers to it only count buffers.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_LINK_UP};

/// `struct virtio_net_hdr_v1` (with `num_buffers`), and the legacy header without it.
pub const HEADER_LEN: usize = 12;
const LEGACY_HEADER_LEN: usize = 10;

/// The header length for the acked features.
pub fn header_len(acked_features: u64) -> usize {
    if acked_features & (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        HEADER_LEN
    } else {
        LEGACY_HEADER_LEN
    }
}

/// The header of a received frame spread over `num_buffers` buffers: no checksum or
/// segmentation offload.
pub fn rx_header(num_buffers: u16) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    header
}

/// `struct virtio_net_config` up to `mtu`: mac, status, max_virtqueue_pairs, mtu.
pub fn config_space(mac: [u8; 6], mtu: u16) -> [u8; 12] {
    let mut space = [0u8; 12];
    space[..6].copy_from_slice(&mac);
    space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    space[8..10].copy_from_slice(&1u16.to_le_bytes());
    space[10..12].copy_from_slice(&mtu.to_le_bytes());
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_mac_link_up_one_pair_and_the_mtu() {
        let space = config_space([1, 2, 3, 4, 5, 6], 1500);
        assert_eq!(space, [1, 2, 3, 4, 5, 6, 1, 0, 1, 0, 0xdc, 0x05]);
    }

    #[test]
    fn the_header_is_12_bytes_with_version_1_or_mergeable_buffers() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(header_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(rx_header(3)[10..], [3, 0]);
    }
}
