//! Codec hot paths: PUBLISH decode/encode at three payload sizes (3.1.1) and at 256 B in MQTT 5.0, CONNECT
//! and SUBSCRIBE decode/encode.
//!
//! Decoding is measured the way the broker reads: many packets back to back in one read buffer, each
//! `decode` call splitting the next frame off the front. Every timed iteration decodes a whole buffer of
//! [`PACKETS_PER_BUFFER`] packets, and the throughput is reported per packet.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use coremq::protocol::properties::Properties;
use coremq::protocol::{
    decode, encode, encode_publish, encode_publish_head, encode_publish_head_v5, Connect, Packet,
    ProtocolVersion, Publish, QoS, Subscribe, SubscribeFilter, Utf8Bytes, Will,
};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use smallvec::smallvec;

// The broker runs on mimalloc (src/main.rs); the decoder's boxes and the frames' shared-buffer headers
// should be measured with the allocator they get in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Packets in one read buffer: about what one 64 KiB read holds of small PUBLISHes.
const PACKETS_PER_BUFFER: usize = 64;
/// The broker's default `max_packet_size` (1 MiB, src/config/keys.rs).
const MAX_PACKET: usize = 1 << 20;
const PAYLOAD_SIZES: [usize; 3] = [16, 256, 4096];
/// Buffers prepared per timed batch for the decode benches: fresh (unshared) buffers like a socket read
/// produces, but bounded so that 4 KiB payloads cost at most 16 × 256 KiB = 4 MiB of setup memory.
const DECODE_BATCH: BatchSize = BatchSize::NumIterations(16);

fn publish(payload_len: usize, pkid: u16) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Utf8Bytes::from_static("site/17/dev/42/temp"),
        pkid,
        payload: Bytes::from(vec![0xa5; payload_len]),
        properties: None,
    }
}

fn connect() -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_session: true,
        keep_alive: 60,
        client_id: Utf8Bytes::from_static("sensor-gateway-000123"),
        will: Some(Will {
            topic: Utf8Bytes::from_static("site/17/dev/42/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        }),
        username: Some(Utf8Bytes::from_static("device-42")),
        password: Some(Bytes::from_static(b"s3cr3t-t0ken-0123456789abcdef")),
        properties: Properties::default(),
    }
}

fn subscribe() -> Subscribe {
    Subscribe {
        pkid: 7,
        filters: smallvec![
            SubscribeFilter::new(Utf8Bytes::from_static("site/17/dev/+/temp"), QoS::AtLeastOnce),
            SubscribeFilter::new(Utf8Bytes::from_static("site/17/dev/42/#"), QoS::AtMostOnce),
            SubscribeFilter::new(Utf8Bytes::from_static("site/+/alarm"), QoS::ExactlyOnce),
            SubscribeFilter::new(Utf8Bytes::from_static("$SYS/broker/clients/connected"), QoS::AtMostOnce),
        ],
        subscription_id: None,
    }
}

/// [`PACKETS_PER_BUFFER`] encodings of `packet`, back to back; checked to decode back to `packet`.
fn buffer_of(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut buf = BytesMut::new();
    for _ in 0..PACKETS_PER_BUFFER {
        encode(packet, version, &mut buf);
    }
    let mut check = buf.clone();
    let first = decode(&mut check, version, MAX_PACKET).expect("valid").expect("complete");
    assert_eq!(&first, packet, "bench input must round-trip");
    buf
}

/// Decodes every packet of `buf`; returns the emptied buffer so that freeing it is not timed.
fn decode_all(buf: BytesMut) -> BytesMut {
    decode_all_v(buf, ProtocolVersion::V3_1_1)
}

fn decode_all_v(mut buf: BytesMut, version: ProtocolVersion) -> BytesMut {
    for _ in 0..PACKETS_PER_BUFFER {
        let packet = decode(&mut buf, version, MAX_PACKET);
        // Dropping the packet (a reference-count decrement on the frame) is part of the per-packet cost.
        black_box(packet.expect("valid").expect("complete"));
    }
    assert!(buf.is_empty());
    buf
}

fn bench_publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/publish");
    for size in PAYLOAD_SIZES {
        let p = publish(size, 4242);
        let template = buffer_of(&Packet::Publish(p.clone()), ProtocolVersion::V3_1_1);

        group.throughput(Throughput::Elements(PACKETS_PER_BUFFER as u64));
        group.bench_with_input(BenchmarkId::new("decode", size), &template, |b, template| {
            // `BytesMut::clone` copies: each iteration starts from a fresh buffer, as after a read.
            b.iter_batched(|| template.clone(), decode_all, DECODE_BATCH);
        });

        group.throughput(Throughput::Elements(1));
        let mut out = BytesMut::with_capacity(2 * size + 64);
        group.bench_with_input(BenchmarkId::new("encode_head", size), &p, |b, p| {
            b.iter(|| {
                out.clear();
                encode_publish_head(
                    black_box(p.topic.as_str()),
                    black_box(p.qos),
                    black_box(p.pkid),
                    false,
                    false,
                    black_box(p.payload.len()),
                    &mut out,
                );
                black_box(out.len())
            });
        });
        group.bench_with_input(BenchmarkId::new("encode", size), &p, |b, p| {
            b.iter(|| {
                out.clear();
                encode_publish(black_box(p), &mut out);
                black_box(out.len())
            });
        });
    }
    group.finish();
}

fn bench_control(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/control");
    let packets =
        [("connect", Packet::Connect(Box::new(connect()))), ("subscribe4", Packet::Subscribe(subscribe()))];
    let mut out = BytesMut::with_capacity(256);
    for (name, packet) in &packets {
        let template = buffer_of(packet, ProtocolVersion::V3_1_1);
        group.throughput(Throughput::Elements(PACKETS_PER_BUFFER as u64));
        group.bench_with_input(BenchmarkId::new("decode", name), &template, |b, template| {
            b.iter_batched(|| template.clone(), decode_all, DECODE_BATCH);
        });
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("encode", name), packet, |b, packet| {
            b.iter(|| {
                out.clear();
                encode(black_box(packet), ProtocolVersion::V3_1_1, &mut out);
                black_box(out.len())
            });
        });
    }
    group.finish();
}

/// MQTT 5.0 PUBLISH of 256 B: decode of the common case (a plain PUBLISH, empty property block, no
/// allocation for properties) and of one with a message expiry and a content type; whole encode; and the
/// broker's per-subscriber head with a pre-encoded subscription identifier run.
fn bench_publish_v5(c: &mut Criterion) {
    const SIZE: usize = 256;
    let v5 = ProtocolVersion::V5;
    let mut group = c.benchmark_group("codec/publish_v5");
    let plain = publish(SIZE, 4242);
    let props = Properties {
        message_expiry_interval: Some(3600),
        content_type: Some(Utf8Bytes::from_static("application/json")),
        ..Properties::default()
    };
    let with_props = Publish { properties: Some(Box::new(props)), ..plain.clone() };
    for (name, p) in [("plain", &plain), ("props", &with_props)] {
        let packet = Packet::Publish(p.clone());
        let template = buffer_of(&packet, v5);
        group.throughput(Throughput::Elements(PACKETS_PER_BUFFER as u64));
        group.bench_with_input(BenchmarkId::new(format!("decode_{name}"), SIZE), &template, |b, template| {
            b.iter_batched(|| template.clone(), |buf| decode_all_v(buf, v5), DECODE_BATCH);
        });
        group.throughput(Throughput::Elements(1));
        let mut out = BytesMut::with_capacity(2 * SIZE + 64);
        group.bench_with_input(BenchmarkId::new(format!("encode_{name}"), SIZE), &packet, |b, packet| {
            b.iter(|| {
                out.clear();
                encode(black_box(packet), v5, &mut out);
                black_box(out.len())
            });
        });
    }
    // Subscription identifier 0x0B with the value 1234 (a two-byte variable byte integer).
    let sub_id: &[u8] = &[0x0B, 0xd2, 0x09];
    let mut out = BytesMut::with_capacity(2 * SIZE + 64);
    group.bench_with_input(BenchmarkId::new("encode_head", SIZE), &plain, |b, p| {
        b.iter(|| {
            out.clear();
            encode_publish_head_v5(
                black_box(p.topic.as_str()),
                black_box(p.qos),
                black_box(p.pkid),
                false,
                false,
                black_box(&[sub_id]),
                black_box(p.payload.len()),
                &mut out,
            );
            black_box(out.len())
        });
    });
    group.finish();
}

criterion_group!(benches, bench_publish, bench_publish_v5, bench_control);
criterion_main!(benches);
