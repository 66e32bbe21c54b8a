//! The crate's only `unsafe` code: marking the map types as plain old data
//! for aya, which copies them byte for byte to and from the kernel.

use aya::Pod;

use crate::types::{
    FwdEntry, FwdKey, FwdStats, GuardCfg, ImpairCfg, ImpairStats, MeshCfg, MeshEntry, MeshState,
    MeshStats, RateState, SrcKey, SteerCfg, SteerKey,
};

// SAFETY: `#[repr(C)]`, only integer and integer-array fields, padding made
// explicit (checked in types.rs), so every byte pattern is a valid value and
// no byte is uninitialized.
unsafe impl Pod for GuardCfg {}
// SAFETY: as above: `#[repr(C)]`, a byte array.
unsafe impl Pod for SrcKey {}
// SAFETY: as above: `#[repr(C)]`, one u64.
unsafe impl Pod for RateState {}
// SAFETY: as above: `#[repr(C)]`, byte arrays and u16s, no implicit padding.
unsafe impl Pod for SteerKey {}
// SAFETY: as above: `#[repr(C)]`, two u32s.
unsafe impl Pod for SteerCfg {}
// SAFETY: as above: `#[repr(C)]`, integers, no implicit padding.
unsafe impl Pod for FwdKey {}
// SAFETY: as above: `#[repr(C)]`, integers and an array of `FwdDest` (itself
// integers with explicit padding), no implicit padding.
unsafe impl Pod for FwdEntry {}
// SAFETY: as above: `#[repr(C)]`, integers with explicit padding.
unsafe impl Pod for FwdStats {}
// SAFETY: as above: `#[repr(C)]`, two u32s.
unsafe impl Pod for ImpairCfg {}
// SAFETY: as above: `#[repr(C)]`, three u64s.
unsafe impl Pod for ImpairStats {}
// SAFETY: as above: `#[repr(C)]`, u64 arrays, a `FwdDest` (integers with
// explicit padding), two u32s and a u64, no implicit padding.
unsafe impl Pod for MeshEntry {}
// SAFETY: as above: `#[repr(C)]`, two u32s.
unsafe impl Pod for MeshCfg {}
// SAFETY: as above: `#[repr(C)]`, two u64s and two u32s.
unsafe impl Pod for MeshState {}
// SAFETY: as above: `#[repr(C)]`, five u64s.
unsafe impl Pod for MeshStats {}
