//! The codec's one byte reader: a bounds-checked cursor over a [`Bytes`], used by the packet decoder
//! and by the property block decoder alike, and the one variable byte integer parser (also used on the
//! raw fixed header).
//!
//! Every read checks the bounds first and fails with a [`ReadError`] instead of panicking; nothing is
//! allocated, and every string or binary value is a slice of the input (a reference-count increment,
//! no copy). Each caller turns a [`ReadError`] into its own error type with its own wording, through
//! `From`, so that `?` works in both.

use bytes::Bytes;

use super::types::Utf8Bytes;

/// Why a read failed. Both callers report each as a Malformed Packet (0x81).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The field runs past the end of the input.
    Truncated,
    /// A UTF-8 encoded string is not valid UTF-8 (MQTT-1.5.4-1).
    InvalidUtf8,
    /// A variable byte integer whose fourth byte still has the continuation bit (MQTT-1.5.5).
    VbiTooLong,
}

/// Parses a variable byte integer (MQTT-1.5.5) at the front of `b`: its value and how many bytes it
/// took (1..=4), or `Ok(None)` if `b` ends before it does. Non-minimal encodings (e.g. `0x80 0x00` for
/// 0) are accepted, as the spec allows.
pub(crate) fn vbi_prefix(b: &[u8]) -> Result<Option<(u32, usize)>, ReadError> {
    let mut value = 0u32;
    for i in 0..4 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        // At most 4 * 7 = 28 bits: no overflow.
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(ReadError::VbiTooLong)
}

/// A bounds-checked cursor over a [`Bytes`]; every value it returns is a slice of it.
/// Invariant: `pos <= buf.len()`.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    /// A reader at the start of `buf`.
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    /// A reader at offset `pos` of `buf` (clamped to its end), e.g. past a packet's fixed header.
    pub(crate) fn at(buf: Bytes, pos: usize) -> Reader {
        let pos = pos.min(buf.len());
        Reader { buf, pos }
    }

    /// True once everything has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let a: [u8; N] =
            self.remaining().get(..N).and_then(|s| s.try_into().ok()).ok_or(ReadError::Truncated)?;
        self.pos += N; // N bytes were there: stays within the buffer.
        Ok(a)
    }

    /// A byte.
    pub(crate) fn u8(&mut self) -> Result<u8, ReadError> {
        let [b] = self.array()?;
        Ok(b)
    }

    /// A two-byte big-endian integer (MQTT-1.5.2).
    pub(crate) fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A four-byte big-endian integer (MQTT-1.5.3).
    pub(crate) fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A variable byte integer (MQTT-1.5.5): at most four bytes, see [`vbi_prefix`].
    pub(crate) fn vbi(&mut self) -> Result<u32, ReadError> {
        let (value, n) = vbi_prefix(self.remaining())?.ok_or(ReadError::Truncated)?;
        self.pos += n;
        Ok(value)
    }

    /// The next `n` bytes as a slice (a reference-count increment, no copy).
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, ReadError> {
        if n > self.buf.len() - self.pos {
            return Err(ReadError::Truncated);
        }
        let end = self.pos + n; // At most buf.len(), checked just above.
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }

    /// Binary data: two-byte length, then that many bytes (MQTT-1.5.6).
    pub(crate) fn binary(&mut self) -> Result<Bytes, ReadError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 encoded string (MQTT-1.5.4), checked once here.
    pub(crate) fn string(&mut self) -> Result<Utf8Bytes, ReadError> {
        let b = self.binary()?;
        Utf8Bytes::try_from_bytes(b).map_err(|_| ReadError::InvalidUtf8)
    }

    /// Everything left, as a slice; the reader is then empty.
    pub(crate) fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn r(b: &'static [u8]) -> Reader {
        Reader::new(Bytes::from_static(b))
    }

    #[test]
    fn fixed_width_integers_are_big_endian_and_bounds_checked() {
        let mut x = r(&[1, 0x12, 0x34, 0xde, 0xad, 0xbe, 0xef, 9]);
        assert_eq!(x.u8(), Ok(1));
        assert_eq!(x.u16(), Ok(0x1234));
        assert_eq!(x.u32(), Ok(0xdead_beef));
        // A failed read consumes nothing.
        assert_eq!(x.u16(), Err(ReadError::Truncated));
        assert_eq!(x.u32(), Err(ReadError::Truncated));
        assert_eq!(x.u8(), Ok(9));
        assert!(x.is_empty());
        assert_eq!(x.u8(), Err(ReadError::Truncated));
    }

    #[test]
    fn variable_byte_integers() {
        // The spec's boundary values (table 1-1), minimal and not.
        for (b, v) in [
            (&[0x00][..], 0),
            (&[0x7f], 127),
            (&[0x80, 0x01], 128),
            (&[0xff, 0x7f], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xff, 0xff, 0xff, 0x7f], 268_435_455),
            (&[0x80, 0x00], 0),
        ] {
            assert_eq!(vbi_prefix(b), Ok(Some((v, b.len()))), "{b:x?}");
            let mut x = Reader::new(Bytes::copy_from_slice(b));
            assert_eq!(x.vbi(), Ok(v));
            assert!(x.is_empty());
        }
        assert_eq!(vbi_prefix(&[]), Ok(None));
        assert_eq!(vbi_prefix(&[0x80, 0x80, 0x80]), Ok(None));
        assert_eq!(vbi_prefix(&[0x80, 0x80, 0x80, 0x80]), Err(ReadError::VbiTooLong));
        assert_eq!(vbi_prefix(&[0x80, 0x80, 0x80, 0x80, 0x01]), Err(ReadError::VbiTooLong));
        assert_eq!(r(&[0x80, 0x80]).vbi(), Err(ReadError::Truncated));
        assert_eq!(r(&[0xff, 0xff, 0xff, 0xff]).vbi(), Err(ReadError::VbiTooLong));
    }

    #[test]
    fn strings_and_binary_are_slices_of_the_input() {
        let buf = Bytes::from_static(&[0, 2, b'h', b'i', 0, 1, 0xff, 0, 0, 0, 5, b'x']);
        let mut x = Reader::new(buf.clone());
        assert_eq!(x.string().map(|s| s.as_str().to_owned()), Ok("hi".to_owned()));
        // 0xff is not UTF-8, but it is valid binary data.
        assert_eq!(Reader::at(buf.clone(), 4).binary(), Ok(Bytes::from_static(&[0xff])));
        assert_eq!(x.string(), Err(ReadError::InvalidUtf8));
        assert_eq!(x.string().map(|s| s.len()), Ok(0));
        assert_eq!(x.remaining(), &[0, 5, b'x']);
        assert_eq!(Reader::at(buf.clone(), 9).rest(), Bytes::from_static(&[0, 5, b'x']));
        // A length that announces more than is there (the decoders stop at any error, so where
        // the reader is left after one does not matter).
        assert_eq!(x.binary(), Err(ReadError::Truncated));
        let mut end = Reader::at(buf, 12);
        assert!(end.is_empty());
        assert_eq!(end.rest(), Bytes::new());
    }

    #[test]
    fn take_and_offsets() {
        let mut x = Reader::at(Bytes::from_static(&[1, 2, 3, 4]), 1);
        assert_eq!(x.remaining(), &[2, 3, 4]);
        assert_eq!(x.take(4), Err(ReadError::Truncated));
        assert_eq!(x.take(usize::MAX), Err(ReadError::Truncated));
        assert_eq!(x.take(2), Ok(Bytes::from_static(&[2, 3])));
        assert_eq!(x.take(0), Ok(Bytes::new()));
        assert_eq!(x.take(1), Ok(Bytes::from_static(&[4])));
        assert!(x.is_empty());
        assert!(Reader::at(Bytes::from_static(&[1]), 5).is_empty());
    }
}
