//! VHOST_USER_GET_CONFIG: a window of the device's config space.

/// Exactly `size` bytes of `space` from `offset`: fields a newer driver asks for beyond
/// ours read as zero. (vhost bounds `size` by the message size before it gets here.)
pub fn slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(size as usize).min(space.len());
    let mut out = space[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_past_the_end_read_as_zero() {
        let space = [1, 2, 3, 4];
        assert_eq!(slice(&space, 1, 2), [2, 3]);
        assert_eq!(slice(&space, 2, 4), [3, 4, 0, 0]);
        assert_eq!(slice(&space, 9, 3), [0, 0, 0]);
        assert_eq!(slice(&space, u32::MAX, 1), [0]);
    }
}
