//! TensorBoard's event file for a run folder (`events.out.tfevents.aec`): per epoch, the
//! training loss and each of its terms, the validation loss and its terms, greedy decoding's
//! accuracies, samples per second and the learning rate as scalars, and the `--png-every`
//! pictures as images.
//!
//! The file is a function of `metrics.jsonl` (and the pictures), written whole with every save
//! in the same transaction: a resumed run's file is the uninterrupted run's, and each save's
//! file begins with the previous one's records, so TensorBoard, which reads an event file
//! where it stopped, sees each record once. The format is TFRecord framing (a little-endian
//! length, masked CRC-32C of the length, the data, masked CRC-32C of the data) around
//! `tensorflow.Event` protocol buffers, written with prost as the ONNX export is.

use super::train::EpochMetrics;

/// The event file's name in a run folder (TensorBoard reads files containing `tfevents`).
pub const FILE: &str = "events.out.tfevents.aec";

/// `tensorflow.Event` (event.proto), the fields aec writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The first record: `brain.Event:2`.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "Payload", tags = "2, 4")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `tensorflow.Summary.Image`: an encoded PNG and its size.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// The event file of a run: one record per epoch (scalars, and the epoch's picture when
/// `picture(epoch)` has one), after the file-version record.
pub fn events(metrics: &[EpochMetrics], picture: &dyn Fn(u64) -> Option<Vec<u8>>) -> Vec<u8> {
    use prost::Message;
    let start = metrics.first().map_or(0.0, |m| m.wall_time);
    let mut out = Vec::new();
    let first = Event { wall_time: start, step: 0, what: Some(What::FileVersion("brain.Event:2".into())) };
    record(&mut out, &first.encode_to_vec());
    for m in metrics {
        let scalar = |tag: String, v: f64| Value { tag, payload: Some(Payload::SimpleValue(v as f32)) };
        let mut values = vec![scalar("loss/train".into(), m.train_loss)];
        values.extend(m.terms.iter().map(|(k, v)| scalar(format!("loss/train/{k}"), *v)));
        values.extend(m.val_loss.map(|v| scalar("loss/validation".into(), v)));
        values.extend(m.val_terms.iter().map(|(k, v)| scalar(format!("loss/validation/{k}"), *v)));
        values.extend(m.token_accuracy.map(|v| scalar("accuracy/tokens".into(), v)));
        values.extend(m.sequence_accuracy.map(|v| scalar("accuracy/sequences".into(), v)));
        values.extend(m.bleu.map(|v| scalar("bleu".into(), v)));
        values.extend(m.codebook_perplexity.map(|v| scalar("codebook/perplexity".into(), v)));
        values.extend(m.codebook_usage.map(|v| scalar("codebook/usage".into(), v)));
        values.extend(m.samples_per_s.map(|v| scalar("samples_per_s".into(), v)));
        values.extend(m.lr.map(|v| scalar("learning_rate".into(), v)));
        values.extend(m.weights.iter().map(|(k, v)| scalar(format!("loss_weight/{k}"), *v)));
        if let Some(png) = picture(m.epoch)
            && let Some((width, height)) = png_size(&png)
        {
            let image = Image { height, width, colorspace: 4, encoded_image_string: png };
            values.push(Value { tag: "pictures".into(), payload: Some(Payload::Image(image)) });
        }
        let e = Event {
            wall_time: m.wall_time,
            step: m.epoch as i64,
            what: Some(What::Summary(Summary { value: values })),
        };
        record(&mut out, &e.encode_to_vec());
    }
    out
}

/// The records of an event file, each CRC checked.
pub fn records(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or("a truncated record header")?;
        let len_bytes: [u8; 8] = head[..8].try_into().map_err(|_| "a record length")?;
        let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| "a record too long")?;
        if u32::from_le_bytes([head[8], head[9], head[10], head[11]]) != masked_crc(&head[..8]) {
            return Err(format!("the length of the record at byte {at} fails its CRC"));
        }
        let data = bytes.get(at + 12..at + 12 + len).ok_or("a truncated record")?;
        let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or("a record without its CRC")?;
        if u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) != masked_crc(data) {
            return Err(format!("the record at byte {at} fails its CRC"));
        }
        out.push(data.to_vec());
        at += 16 + len;
    }
    Ok(out)
}

fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the files are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(png: &[u8]) -> Option<(i32, i32)> {
    let w = png.get(16..20)?;
    let h = png.get(20..24)?;
    let n = |b: &[u8]| i32::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])).ok();
    Some((n(w)?, n(h)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // The check value of CRC-32C (RFC 3720, the iSCSI polynomial).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn records_read_back_and_a_flipped_bit_fails() {
        let mut out = Vec::new();
        record(&mut out, b"hello");
        record(&mut out, b"");
        assert_eq!(records(&out), Ok(vec![b"hello".to_vec(), Vec::new()]));
        out[14] ^= 1;
        assert!(records(&out).is_err());
    }
}
