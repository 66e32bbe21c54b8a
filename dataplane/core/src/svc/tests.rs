//! Simulated L1T3, L3T3 and L3T3_KEY streams through a [`LayerSelector`].

use std::time::Instant;

use super::*;
use crate::StreamRewriter;

/// The temporal layer of picture `i` in the 0,2,1,2 pattern.
fn temporal_of(i: usize) -> u8 {
    [0, 2, 1, 2][i % 4]
}

/// One picture of `layers` spatial layers, `packets` packets per layer
/// frame. Frames of T1 and of the T2 right after T0 are temporal switch
/// points (they refer to T0 only); the T2 after T1 is not.
fn picture(i: usize, layers: u8, packets: usize, key: bool) -> Vec<LayerInfo> {
    let temporal = if key { 0 } else { temporal_of(i) };
    let mut out = Vec::new();
    for spatial in 0..layers {
        for p in 0..packets {
            out.push(LayerInfo {
                spatial,
                temporal,
                start_of_frame: p == 0,
                end_of_frame: p + 1 == packets,
                keyframe: key,
                spatial_switch: false,
                temporal_switch: !key && i % 4 != 3 && temporal > 0,
                spatial_layers: key.then_some(layers),
            });
        }
    }
    out
}

/// Pictures `from..to` of a stream with a keyframe at picture 0.
fn stream(layers: u8, packets: usize, from: usize, to: usize) -> Vec<Vec<LayerInfo>> {
    (from..to)
        .map(|i| picture(i, layers, packets, i == 0))
        .collect()
}

/// The stream patterns: L1T3; L3T3 (full SVC: a parser flags the whole key
/// picture as keyframe); L3T3_KEY (K-SVC: only the key picture's S0 is a
/// keyframe, the upper layers predict from it and then from their own layer
/// only, so neither carries a switch point outside the key picture).
#[derive(Debug, Clone, Copy)]
enum Pattern {
    L1T3,
    L3T3,
    L3T3Key,
}

/// Pictures `from..to` of `pattern`, keyframe at picture 0.
fn pattern_stream(pattern: Pattern, packets: usize, from: usize, to: usize) -> Vec<Vec<LayerInfo>> {
    let layers = match pattern {
        Pattern::L1T3 => 1,
        Pattern::L3T3 | Pattern::L3T3Key => 3,
    };
    let mut pics = stream(layers, packets, from, to);
    if let Pattern::L3T3Key = pattern {
        for info in pics.iter_mut().flatten() {
            info.keyframe &= info.spatial == 0;
        }
    }
    pics
}

/// Runs pictures through, returning per picture the verdicts.
fn run(sel: &mut LayerSelector, pictures: &[Vec<LayerInfo>]) -> Vec<Vec<Verdict>> {
    pictures
        .iter()
        .map(|p| p.iter().map(|i| sel.select(i)).collect())
        .collect()
}

/// The (spatial, temporal) of each forwarded packet of a picture.
fn forwarded(pic: &[LayerInfo], v: &[Verdict]) -> Vec<(u8, u8)> {
    pic.iter()
        .zip(v)
        .filter(|(_, v)| v.is_forward())
        .map(|(i, _)| (i.spatial, i.temporal))
        .collect()
}

/// Every picture with something forwarded has exactly one marker, on its
/// last forwarded packet.
fn assert_markers(verdicts: &[Vec<Verdict>]) {
    for (n, v) in verdicts.iter().enumerate() {
        let sent: Vec<Verdict> = v.iter().copied().filter(|v| v.is_forward()).collect();
        if sent.is_empty() {
            continue;
        }
        let markers = sent.iter().filter(|v| v.marker()).count();
        assert_eq!(markers, 1, "picture {n}: {v:?}");
        assert!(
            sent.last().is_some_and(|v| v.marker()),
            "picture {n}: {v:?}"
        );
    }
}

fn frames_forwarded(verdicts: &[Vec<Verdict>]) -> usize {
    verdicts
        .iter()
        .filter(|v| v.iter().any(|v| v.is_forward()))
        .count()
}

#[test]
fn l1t3_at_the_top_forwards_every_frame_with_its_marker() {
    let mut sel = LayerSelector::new();
    let pics = stream(1, 3, 0, 16);
    let v = run(&mut sel, &pics);
    assert!(v.iter().flatten().all(|v| v.is_forward()));
    assert_markers(&v);
    let temporals: Vec<u8> = pics.iter().take(5).map(|p| p[0].temporal).collect();
    assert_eq!(temporals, [0, 2, 1, 2, 0], "key, then the 0,2,1,2 pattern");
    assert_eq!(sel.current().map(|c| c.spatial), Some(0));
}

#[test]
fn dropping_t2_halves_the_frame_rate_and_t0_quarters_it() {
    for (temporal, frames) in [(2, 32), (1, 16), (0, 8)] {
        let mut sel = LayerSelector::new();
        sel.set_target(Layers {
            spatial: 0,
            temporal,
        });
        let pics = stream(1, 2, 0, 32);
        let v = run(&mut sel, &pics);
        assert_eq!(frames_forwarded(&v), frames, "target T{temporal}");
        assert_markers(&v);
        for (p, v) in pics.iter().zip(&v) {
            for (t, _) in forwarded(p, v) {
                assert!(t <= temporal);
            }
        }
    }
}

#[test]
fn before_the_first_keyframe_nothing_is_forwarded_and_a_keyframe_is_wanted() {
    let mut sel = LayerSelector::new();
    // Joined mid-stream: pictures 1.. have no keyframe.
    let pics = stream(3, 2, 1, 1 + 2 * KEYFRAME_RETRY_PICTURES as usize);
    assert!(!sel.wants_keyframe());
    let first = run(&mut sel, &pics[..1]);
    assert!(first.iter().flatten().all(|v| *v == Verdict::Drop));
    assert!(sel.take_keyframe_request(), "asked at once");
    assert!(!sel.take_keyframe_request(), "taken");
    let rest = run(&mut sel, &pics[1..]);
    assert!(rest.iter().flatten().all(|v| *v == Verdict::Drop));
    assert_eq!(sel.current(), None);
    assert!(sel.take_keyframe_request(), "asked again while waiting");
    // A keyframe of a higher layer only (its S0 lost) is no start either.
    let upper_key = &picture(0, 3, 2, true)[2..];
    assert!(upper_key.iter().all(|i| sel.select(i) == Verdict::Drop));
    let v = run(&mut sel, &[picture(0, 3, 2, true)]);
    assert!(v[0].iter().all(|v| v.is_forward()));
    assert_eq!(
        sel.current(),
        Some(Layers {
            spatial: 2,
            temporal: u8::MAX
        })
    );
    assert!(!sel.wants_keyframe());
}

#[test]
fn spatial_pins_forward_only_those_layers() {
    for pattern in [Pattern::L3T3, Pattern::L3T3Key] {
        for pin in 0..3u8 {
            let mut sel = LayerSelector::new();
            sel.set_target(Layers {
                spatial: pin,
                temporal: 2,
            });
            let pics = pattern_stream(pattern, 2, 0, 12);
            let v = run(&mut sel, &pics);
            assert_markers(&v);
            for (p, v) in pics.iter().zip(&v) {
                let sent = forwarded(p, v);
                let spatials: Vec<u8> = sent.iter().map(|s| s.0).collect();
                let expected: Vec<u8> = (0..=pin).flat_map(|s| [s, s]).collect();
                assert_eq!(spatials, expected, "{pattern:?} pin S{pin}");
            }
            assert_eq!(sel.current().map(|c| c.spatial), Some(pin));
            assert!(!sel.wants_keyframe());
        }
    }
}

#[test]
fn a_pin_above_the_stream_is_its_top_layer() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 5,
        temporal: 9,
    });
    let v = run(&mut sel, &stream(3, 2, 0, 8));
    assert!(v.iter().flatten().all(|v| v.is_forward()));
    assert_markers(&v);
    assert_eq!(
        sel.current(),
        Some(Layers {
            spatial: 2,
            temporal: 9
        })
    );
    assert!(!sel.wants_keyframe(), "no up-switch waits");
}

#[test]
fn spatial_down_switch_happens_at_the_next_picture_start() {
    let mut sel = LayerSelector::new();
    run(&mut sel, &stream(3, 2, 0, 4));
    let pic = picture(4, 3, 2, false);
    // S0 of picture 4 goes out, then the target drops to S0.
    assert!(sel.select(&pic[0]).is_forward());
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    let rest: Vec<Verdict> = pic[1..].iter().map(|i| sel.select(i)).collect();
    assert!(
        rest.iter().all(|v| v.is_forward()),
        "the picture is not split"
    );
    assert!(
        rest.last().is_some_and(|v| v.marker()),
        "ends at S2 as begun"
    );
    assert!(!rest[0].marker(), "S0's end is no end of picture");
    let v = run(&mut sel, &stream(3, 2, 5, 9));
    assert_markers(&v);
    for (p, v) in stream(3, 2, 5, 9).iter().zip(&v) {
        assert!(forwarded(p, v).iter().all(|s| s.0 == 0));
    }
    assert_eq!(sel.current().map(|c| c.spatial), Some(0));
    assert!(!sel.wants_keyframe(), "going down needs no keyframe");
}

#[test]
fn a_temporal_target_change_mid_frame_does_not_split_the_frame() {
    let mut sel = LayerSelector::new();
    run(&mut sel, &stream(1, 4, 0, 5));
    // Picture 5 is T2: half of it is sent when the target drops to T0.
    let pic = picture(5, 1, 4, false);
    assert_eq!(pic[0].temporal, 2);
    assert!(sel.select(&pic[0]).is_forward());
    assert!(sel.select(&pic[1]).is_forward());
    sel.set_target(Layers {
        spatial: 0,
        temporal: 0,
    });
    assert!(sel.select(&pic[2]).is_forward());
    assert!(sel.select(&pic[3]).marker(), "the frame ends as it began");
    // From the next frame start on: T0 only.
    let pics = stream(1, 4, 6, 14);
    let v = run(&mut sel, &pics);
    assert_eq!(frames_forwarded(&v), 2, "pictures 8 and 12");
    assert_markers(&v);
}

#[test]
fn a_temporal_up_switch_waits_for_a_switch_point() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 0,
        temporal: 1,
    });
    run(&mut sel, &stream(1, 2, 0, 3)); // pictures 0 (T0), 1 (T2), 2 (T1)
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    // Picture 3 is a T2 that is no switch point (it refers to picture 2's T1,
    // which was sent, but only a marked point is trusted).
    let v = run(&mut sel, &stream(1, 2, 3, 4));
    assert_eq!(frames_forwarded(&v), 0);
    // Picture 4 is T0 (stays at T1), picture 5 a T2 switch point.
    let v = run(&mut sel, &stream(1, 2, 4, 6));
    assert_eq!(frames_forwarded(&v), 2);
    assert_eq!(sel.current().map(|c| c.temporal), Some(2));
    assert!(!sel.wants_keyframe(), "temporal switches need no keyframe");
    // With T0 as the current layer, a T1 switch point lifts it one step.
    let mut sel = LayerSelector::new();
    sel.set_target(Layers::BASE);
    run(&mut sel, &stream(1, 2, 0, 2));
    sel.set_target(Layers {
        spatial: 0,
        temporal: 1,
    });
    let v = run(&mut sel, &stream(1, 2, 2, 4)); // T1 (switch), T2
    assert_eq!(frames_forwarded(&v), 1);
    assert_eq!(sel.current().map(|c| c.temporal), Some(1));
}

#[test]
fn l3t3_key_spatial_up_switch_waits_for_a_keyframe_and_asks_for_one() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    run(&mut sel, &pattern_stream(Pattern::L3T3Key, 2, 0, 3));
    sel.set_target(Layers {
        spatial: 2,
        temporal: 2,
    });
    for i in 3..3 + KEYFRAME_WAIT_PICTURES as usize {
        let v = run(&mut sel, &[picture(i, 3, 2, false)]);
        assert!(
            !sel.wants_keyframe(),
            "picture {i}: waits for a switch point"
        );
        assert_eq!(
            forwarded(&picture(i, 3, 2, false), &v[0]).len(),
            2,
            "S0 only"
        );
    }
    let v = run(&mut sel, &stream(3, 2, 5, 8));
    assert_markers(&v);
    assert!(sel.take_keyframe_request(), "none came: asked");
    assert_eq!(sel.current().map(|c| c.spatial), Some(0));
    // The keyframe switches the whole picture up, with one marker, at S2.
    let key = pattern_stream(Pattern::L3T3Key, 2, 0, 1).remove(0);
    let v = run(&mut sel, std::slice::from_ref(&key));
    assert_eq!(forwarded(&key, &v[0]).len(), 6);
    assert_markers(&v);
    assert_eq!(sel.current().map(|c| c.spatial), Some(2));
    assert!(!sel.wants_keyframe());
}

#[test]
fn l3t3_spatial_up_switch_at_a_switch_point_one_layer_at_a_time() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    run(&mut sel, &stream(3, 2, 0, 2));
    sel.set_target(Layers {
        spatial: 2,
        temporal: 2,
    });
    // A switch point of S2 alone does not skip S1.
    let mut pic = picture(2, 3, 2, false);
    pic[4].spatial_switch = true;
    let v = run(&mut sel, std::slice::from_ref(&pic));
    assert_eq!(forwarded(&pic, &v[0]), [(0, 1), (0, 1)]);
    // A switch point of S1 lifts to S1 from its frame start on.
    let mut pic = picture(3, 3, 2, false);
    pic[2].spatial_switch = true;
    let v = run(&mut sel, std::slice::from_ref(&pic));
    assert_eq!(forwarded(&pic, &v[0]), [(0, 2), (0, 2), (1, 2), (1, 2)]);
    assert!(v[0][3].marker(), "S1's end ends the picture sent");
    assert_eq!(sel.current().map(|c| c.spatial), Some(1));
    // Later pictures carry S0 and S1, one marker each.
    let pics = stream(3, 2, 4, 8);
    let v = run(&mut sel, &pics);
    assert_markers(&v);
    for (p, v) in pics.iter().zip(&v) {
        assert!(forwarded(p, v).iter().all(|s| s.0 <= 1));
    }
}

#[test]
fn markers_match_the_highest_layer_forwarded_across_patterns_and_targets() {
    for (pattern, layers) in [
        (Pattern::L1T3, 1),
        (Pattern::L3T3, 3),
        (Pattern::L3T3Key, 3),
    ] {
        for spatial in 0..layers {
            for temporal in 0..3u8 {
                let mut sel = LayerSelector::new();
                sel.set_target(Layers { spatial, temporal });
                let pics = pattern_stream(pattern, 3, 0, 24);
                let v = run(&mut sel, &pics);
                assert_markers(&v);
                // 24 pictures: all at T2, half at T1, a quarter at T0.
                assert_eq!(frames_forwarded(&v), 24 >> (2 - temporal));
            }
        }
    }
    // A stream that announces fewer layers: its top layer ends the picture
    // even when the target is higher.
    let mut sel = LayerSelector::new();
    let mut pics = stream(2, 2, 0, 6);
    for p in &mut pics {
        for i in p.iter_mut() {
            i.spatial_layers = Some(2);
        }
    }
    let v = run(&mut sel, &pics);
    assert_markers(&v);
    assert_eq!(sel.current().map(|c| c.spatial), Some(1));
}

#[test]
fn a_layer_the_stream_stops_announcing_is_left_at_the_next_picture() {
    let mut sel = LayerSelector::new();
    run(&mut sel, &stream(3, 2, 0, 4));
    assert_eq!(sel.current().map(|c| c.spatial), Some(2));
    // The publisher drops S2 and says so.
    let mut pic = picture(4, 2, 2, false);
    pic[0].spatial_layers = Some(2);
    let v = run(&mut sel, std::slice::from_ref(&pic));
    assert_markers(&v);
    assert_eq!(sel.current().map(|c| c.spatial), Some(1));
    // When S2 comes back, it waits for a keyframe as any up-switch.
    let mut pic = picture(5, 3, 2, false);
    pic[0].spatial_layers = Some(3);
    let v = run(&mut sel, std::slice::from_ref(&pic));
    assert_eq!(forwarded(&pic, &v[0]).len(), 4);
    assert_markers(&v);
}

#[test]
fn loss_during_a_spatial_switch_goes_back_and_asks_for_a_keyframe() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    run(&mut sel, &stream(3, 3, 0, 2));
    sel.set_target(Layers {
        spatial: 1,
        temporal: 2,
    });
    let mut pic = picture(2, 3, 3, false);
    pic[3].spatial_switch = true;
    // S0 and the first packet of S1 (the switch) go out ...
    for i in &pic[..4] {
        assert!(sel.select(i).is_forward());
    }
    assert_eq!(sel.current().map(|c| c.spatial), Some(1));
    // ... then S1's second packet is lost.
    sel.note_loss();
    assert_eq!(sel.current().map(|c| c.spatial), Some(0), "back to S0");
    assert!(sel.take_keyframe_request(), "the switch point is gone");
    assert_eq!(sel.select(&pic[5]), Verdict::Drop);
    // The next pictures are S0 only: nothing refers to the partial S1.
    let pics = stream(3, 3, 3, 6);
    let v = run(&mut sel, &pics);
    assert_markers(&v);
    for (p, v) in pics.iter().zip(&v) {
        assert!(forwarded(p, v).iter().all(|s| s.0 == 0));
    }
    // A loss after the switch picture ended keeps the layer.
    let mut sel = LayerSelector::new();
    run(&mut sel, &stream(3, 3, 0, 1));
    sel.note_loss(); // between pictures
    assert_eq!(sel.current().map(|c| c.spatial), Some(2));
    assert!(!sel.wants_keyframe(), "left to the receiver");
}

#[test]
fn loss_during_a_keyframe_keeps_only_its_whole_layers() {
    // A gap inside S0 of the first keyframe: nothing is decodable.
    let mut sel = LayerSelector::new();
    let key = picture(0, 3, 3, true);
    assert!(sel.select(&key[0]).is_forward());
    sel.note_loss();
    assert_eq!(sel.current(), None, "the keyframe is broken");
    assert!(sel.take_keyframe_request());
    assert!(key[2..].iter().all(|i| sel.select(i) == Verdict::Drop));
    let v = run(&mut sel, &stream(3, 3, 1, 4));
    assert_eq!(frames_forwarded(&v), 0);
    let v = run(&mut sel, std::slice::from_ref(&key));
    assert!(v[0].iter().all(|v| v.is_forward()));
    assert_markers(&v);

    // A gap inside S1 of a keyframe that lifted S0 to S2: S0 is whole.
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    run(&mut sel, &stream(3, 3, 0, 3));
    sel.set_target(Layers {
        spatial: 2,
        temporal: 2,
    });
    for i in &key[..4] {
        assert!(sel.select(i).is_forward());
    }
    assert_eq!(sel.current().map(|c| c.spatial), Some(2));
    sel.note_loss();
    assert_eq!(sel.current().map(|c| c.spatial), Some(0), "S1 is not whole");
    assert!(sel.take_keyframe_request(), "for another try at S2");
    assert!(key[5..].iter().all(|i| sel.select(i) == Verdict::Drop));
    let pics = stream(3, 3, 1, 4);
    let v = run(&mut sel, &pics);
    assert_markers(&v);
    for (p, v) in pics.iter().zip(&v) {
        assert!(forwarded(p, v).iter().all(|s| s.0 == 0));
    }

    // A gap between S1 and S2 of the key picture: S0 and S1 are whole.
    let mut sel = LayerSelector::new();
    for i in &key[..6] {
        assert!(sel.select(i).is_forward());
    }
    sel.note_loss();
    assert_eq!(sel.current().map(|c| c.spatial), Some(1));
    assert!(sel.wants_keyframe());
    assert!(key[6..].iter().all(|i| sel.select(i) == Verdict::Drop));
}

#[test]
fn loss_during_a_temporal_switch_goes_back_without_a_keyframe() {
    let mut sel = LayerSelector::new();
    sel.set_target(Layers::BASE);
    run(&mut sel, &stream(1, 3, 0, 4));
    sel.set_target(Layers {
        spatial: 0,
        temporal: 2,
    });
    run(&mut sel, &stream(1, 3, 4, 5)); // T0
    let pic = picture(5, 1, 3, false); // T2 switch point
    assert!(sel.select(&pic[0]).is_forward());
    sel.note_loss();
    assert_eq!(sel.current().map(|c| c.temporal), Some(0));
    assert!(!sel.wants_keyframe());
    assert_eq!(sel.select(&pic[2]), Verdict::Drop);
    // Picture 6 (T1) is the next switch point, to T1; picture 7 (a T2 that
    // refers to it) is none; picture 9 (T2 after T0) lifts to T2.
    let v = run(&mut sel, &stream(1, 3, 6, 10));
    assert_eq!(frames_forwarded(&v), 3, "pictures 6, 8 and 9");
    assert!(v[1].iter().all(|v| *v == Verdict::Drop));
    assert_markers(&v);
    assert_eq!(sel.current().map(|c| c.temporal), Some(2));
}

#[test]
fn loss_inside_a_base_layer_frame_asks_for_a_keyframe() {
    let mut sel = LayerSelector::new();
    run(&mut sel, &stream(1, 3, 0, 4));
    let pic = picture(4, 1, 3, false); // T0
    assert!(sel.select(&pic[0]).is_forward());
    sel.note_loss();
    assert!(sel.take_keyframe_request());
    // Inside a T2 frame, the loss is left to the receiver.
    run(&mut sel, &stream(1, 3, 5, 9));
    let pic = picture(9, 1, 3, false); // T2
    assert!(sel.select(&pic[0]).is_forward());
    sel.note_loss();
    assert!(!sel.wants_keyframe());
    assert_eq!(sel.current().map(|c| c.temporal), Some(u8::MAX));
}

#[test]
fn the_rewriter_skips_what_the_selector_drops() {
    let t0 = Instant::now();
    let mut sel = LayerSelector::new();
    sel.set_target(Layers {
        spatial: 1,
        temporal: 1,
    });
    let mut rw = StreamRewriter::new(90_000, 500);
    let pics = stream(3, 2, 0, 16);
    let mut seq = 40_000u16;
    let mut sent = Vec::new();
    for (n, pic) in pics.iter().enumerate() {
        for info in pic {
            let ts = n as u32 * 3000;
            match sel.select(info) {
                Verdict::Forward { .. } => {
                    let out = rw.rewrite(t0, 7, seq, ts).expect("forwarded");
                    sent.push(out.seq);
                }
                Verdict::Drop => rw.skip(7, seq),
            }
            seq = seq.wrapping_add(1);
        }
    }
    // S0+S1 of the 8 pictures at T0 or T1: 4 packets each, numbered 500 on.
    assert_eq!(sent, (500..500 + 32).collect::<Vec<u64>>());
}

#[test]
fn late_packets_are_decided_by_the_current_layers_without_a_switch() {
    let mut sel = LayerSelector::new();
    assert_eq!(sel.select_late(&picture(0, 1, 2, true)[0]), Verdict::Drop);
    sel.set_target(Layers {
        spatial: 1,
        temporal: 1,
    });
    run(&mut sel, &pattern_stream(Pattern::L3T3, 2, 0, 6));
    let before = sel.current();
    // A late copy of the keyframe restarts nothing; its S2 stays out.
    let key = picture(0, 3, 2, true);
    let v: Vec<Verdict> = key.iter().map(|i| sel.select_late(i)).collect();
    assert_eq!(forwarded(&key, &v).len(), 4);
    assert!(v[3].marker(), "S1's end ends the picture sent");
    // A late T2 switch point switches nothing.
    let t2 = picture(5, 3, 2, false);
    assert!(t2.iter().all(|i| sel.select_late(i) == Verdict::Drop));
    assert_eq!(sel.current(), before);
}
