//! Active-speaker detection from RFC 6464 audio levels.

use crate::ids::ParticipantId;

/// Smoothed loudness per speaker; the loudest one, if clearly speaking and
/// loud enough for long enough, becomes the active speaker.
#[derive(Debug, Default)]
pub struct SpeakerDetector {
    /// (participant, smoothed level in dBov as a positive 0..=127 attenuation,
    /// ticks above threshold)
    levels: Vec<(ParticipantId, f32, u32)>,
    current: Option<ParticipantId>,
}

/// Attenuation (in dB below overload) under which a participant counts as
/// speaking. 127 is silence; room noise through a headset is around 70-90.
const SPEAKING_BELOW: f32 = 70.0;
/// How fast a speaker's level falls back towards silence, per packet (dB).
/// At 50 packets/s this is 25 dB/s, so short pauses between words hold.
const RELEASE_PER_PACKET: f32 = 0.5;
/// Packets the sender's voice-activity detector calls non-voice count as
/// this much quieter (a tone or music is still audible, but speech wins).
const NON_VOICE_PENALTY: u8 = 15;
/// Consecutive ticks a candidate must lead before taking over.
const HOLD_TICKS: u32 = 2;

impl SpeakerDetector {
    /// Feeds one packet's level (`attenuation` 0 = loudest, 127 = silence).
    /// The level follows peaks at once and releases slowly (a peak meter),
    /// so the gaps between syllables do not end a turn.
    pub fn observe(&mut self, who: ParticipantId, attenuation: u8, voice: bool) {
        let attenuation = attenuation.min(127);
        let sample = if voice {
            attenuation
        } else {
            attenuation.saturating_add(NON_VOICE_PENALTY).min(127)
        };
        let sample = f32::from(sample);
        match self.levels.iter_mut().find(|(p, _, _)| *p == who) {
            Some((_, level, _)) => {
                *level = if sample < *level {
                    sample
                } else {
                    (*level + RELEASE_PER_PACKET).min(sample)
                };
            }
            None => self.levels.push((who, sample, 0)),
        }
    }

    pub fn forget(&mut self, who: ParticipantId) {
        self.levels.retain(|(p, _, _)| *p != who);
        if self.current == Some(who) {
            self.current = None;
        }
    }

    /// Called on a fixed tick; returns the new active speaker and its level
    /// (negative dBov) when it changes.
    pub fn tick(&mut self) -> Option<(Option<ParticipantId>, i8)> {
        let loudest = self
            .levels
            .iter()
            .filter(|(_, l, _)| *l < SPEAKING_BELOW)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(p, l, _)| (*p, *l));
        for entry in &mut self.levels {
            if loudest.is_some_and(|(p, _)| p == entry.0) {
                entry.2 += 1;
            } else {
                entry.2 = 0;
            }
        }
        // Decay everybody towards silence so a participant who stops sending
        // audio stops being the speaker.
        for entry in &mut self.levels {
            entry.1 = entry.1 * 0.95 + 127.0 * 0.05;
        }
        match loudest {
            Some((p, level)) if self.current != Some(p) => {
                let held = self.levels.iter().find(|e| e.0 == p).map_or(0, |e| e.2);
                if held >= HOLD_TICKS || self.current.is_none() {
                    self.current = Some(p);
                    return Some((Some(p), -(level.round() as i8)));
                }
                None
            }
            None if self.current.is_some() => {
                self.current = None;
                Some((None, -127))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loud_participant_becomes_speaker_and_silence_clears_it() {
        let (a, b) = (ParticipantId(1), ParticipantId(2));
        let mut d = SpeakerDetector::default();
        for _ in 0..50 {
            d.observe(a, 20, true);
            d.observe(b, 100, true);
        }
        assert_eq!(d.tick().map(|x| x.0), Some(Some(a)));
        assert_eq!(d.tick(), None, "no change, no event");
        for _ in 0..50 {
            d.observe(a, 127, false);
            d.observe(b, 10, true);
        }
        // b needs to lead for HOLD_TICKS ticks before it takes over.
        let mut got = None;
        for _ in 0..4 {
            if let Some(e) = d.tick() {
                got = Some(e.0);
            }
        }
        assert_eq!(got, Some(Some(b)));
    }
}
