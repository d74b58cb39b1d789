//! A layer's bytes as the unpacker reads them: the compression found
//! from its first bytes (gzip, zstd or none), and the stream's limits
//! (decompressed size, and how far the tar reader may read ahead).

use super::*;

/// How a layer's stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// The compression of a stream that starts with `head` (up to 4 bytes).
    pub(super) fn detect(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd] => Self::Zstd,
            // A skippable zstd frame (magic 0x184D2A5?).
            [b0, 0x2a, 0x4d, 0x18] if b0 & 0xf0 == 0x50 => Self::Zstd,
            _ => Self::None,
        }
    }

    /// What reading a stream of this compression is, for error messages.
    pub(super) fn reading(self) -> &'static str {
        match self {
            Self::None => "read the tar stream",
            Self::Gzip => "decompress the gzip stream",
            Self::Zstd => "decompress the zstd stream",
        }
    }
}

/// Detects the compression of `reader` from its first bytes, and returns it
/// with a reader of the decompressed stream.
pub(super) fn decompress<'a, R: Read + 'a>(
    mut reader: R,
) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut head = [0; 4];
    let len = read_up_to(&mut reader, &mut head)?;
    let compression = Compression::detect(&head[..len]);
    let stream = BufReader::new(io::Cursor::new(head[..len].to_vec()).chain(reader));
    let decompressed: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(stream)),
        Compression::Zstd => Box::new(ZstdReader::new(stream)),
    };
    Ok((compression, decompressed))
}

/// Reads into `buf` until it is full or the stream ends; returns the length read.
pub(super) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match reader.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

/// A reader of a zstd stream of one or more frames; skippable frames are
/// skipped. (ruzstd's `StreamingDecoder` reads one frame only.)
pub(super) struct ZstdReader<R> {
    pub(super) source: R,
    pub(super) decoder: FrameDecoder,
    /// Whether a frame is being decoded (its header has been read).
    pub(super) in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    pub(super) fn new(source: R) -> Self {
        Self {
            source,
            decoder: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Decodes the current frame into `buf`; 0 once the frame is done.
    pub(super) fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let decoder = &mut self.decoder;
        while decoder.can_collect() < buf.len() && !decoder.is_finished() {
            let wanted = buf.len() - decoder.can_collect();
            decoder
                .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(wanted))
                .map_err(io::Error::other)?;
        }
        let len = decoder.read(buf)?;
        if len == 0 {
            // All of the frame has been read: its checksum covers it.
            if let (Some(stored), Some(computed)) = (
                decoder.get_checksum_from_data(),
                decoder.get_calculated_checksum(),
            ) {
                if stored != computed {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "zstd frame checksum mismatch",
                    ));
                }
            }
        }
        Ok(len)
    }

    /// Starts the next frame. Returns false at the end of the stream.
    pub(super) fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => self.skip(length.into())?,
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }

    /// Skips `len` bytes of the source (a skippable frame's contents).
    pub(super) fn skip(&mut self, len: u64) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.source).take(len), &mut io::sink())?;
        if skipped < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends inside a skippable zstd frame",
            ));
        }
        Ok(())
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                let len = self.read_frame(buf)?;
                if len > 0 {
                    return Ok(len);
                }
                self.in_frame = false;
            }
            if !self.next_frame()? {
                return Ok(0);
            }
            self.in_frame = true;
        }
    }
}

/// The decompressed layer, as the tar reader reads it: hashed (for the
/// diff ID), counted, and with the first read error kept whole (the tar
/// reader only passes on its message).
pub(super) struct LayerStream<'a> {
    pub(super) inner: Box<dyn Read + 'a>,
    pub(super) hasher: Sha256,
    /// How many bytes have been read.
    pub(super) len: u64,
    /// The first error reading `inner`.
    pub(super) error: Option<io::Error>,
    pub(super) limits: Limits,
    /// Where the tar reader must have handed out the next entry: the
    /// current entry's data, then at most `max_header_bytes` of the next
    /// one's headers ([`Unpacker::unpack_all`] moves it on).
    pub(super) until: std::rc::Rc<std::cell::Cell<u64>>,
    /// Which limit the stream went beyond.
    pub(super) refused: Option<String>,
}

impl<'a> LayerStream<'a> {
    pub(super) fn new(inner: Box<dyn Read + 'a>, limits: Limits) -> Self {
        let until = limits
            .max_header_bytes
            .saturating_add((HEADER_BLOCKS + 1) * BLOCK_SIZE);
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
            error: None,
            limits,
            until: std::rc::Rc::new(std::cell::Cell::new(until)),
            refused: None,
        }
    }

    pub(super) fn refuse(&mut self, why: String) -> io::Error {
        let error = io::Error::other(why.clone());
        self.refused.get_or_insert(why);
        error
    }

    /// Checks that the tar reader stopped at the end-of-archive marker, not
    /// at the end of the stream, and reads the rest of the stream into the
    /// hash. `archive_end` is where the last entry's data ends.
    pub(super) fn finish(&mut self, archive_end: u64) -> Result<(), UnpackError> {
        // The tar reader stops at the first zero block after the last entry,
        // but also, without an error, where the stream ends instead.
        if self.len < archive_end.saturating_add(BLOCK_SIZE) {
            return Err(tar_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ends before the end-of-archive marker",
            )));
        }
        self.until.set(u64::MAX);
        io::copy(self, &mut io::sink()).map_err(tar_error)?;
        Ok(())
    }
}

impl Read for LayerStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len >= self.limits.max_bytes {
            // Past the limit by a byte: a stream of exactly the limit is
            // fine, so look one byte further before refusing.
            let mut probe = [0u8];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            return Err(self.refuse(format!(
                "it unpacks to more than {} bytes (--max-layer-size)",
                self.limits.max_bytes
            )));
        }
        let room = self.until.get().saturating_sub(self.len);
        if room == 0 {
            return Err(self.refuse(format!(
                "an entry's headers (PAX records, long names) take more than {} bytes (--max-header-size)",
                self.limits.max_header_bytes
            )));
        }
        let most = room
            .min(self.limits.max_bytes - self.len)
            .min(buf.len() as u64) as usize;
        let buf = &mut buf[..most];
        match self.inner.read(buf) {
            Ok(len) => {
                self.hasher.update(&buf[..len]);
                self.len += len as u64;
                Ok(len)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let passed_on = io::Error::new(e.kind(), e.to_string());
                self.error.get_or_insert(e);
                Err(passed_on)
            }
        }
    }
}
