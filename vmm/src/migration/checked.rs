//! Deserializers that check what they read, for the state section of a
//! migration stream (untrusted input):
//!
//! - [`Exact`]: a kvm-bindings struct from exactly `size_of::<T>()` bytes.
//!   kvm-bindings' own `Deserialize` zero-pads a short array and drops the
//!   end of a long one; this refuses both, naming the field.
//! - [`List`]: a list of `min..=max` elements, refused at the first element
//!   past `max` (nothing more is read or allocated).
//! - [`Opt`]: `null` or one of the above.
//!
//! Each is a [`DeserializeSeed`] carrying the field's name for its error
//! messages; `VmState`'s fields use them through `deserialize_with`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::BytesDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, SeqAccess, Visitor};

/// A kvm-bindings struct `T` from exactly `size_of::<T>()` bytes.
pub struct Exact<T> {
    field: &'static str,
    _t: PhantomData<fn() -> T>,
}

impl<T> Exact<T> {
    pub const fn new(field: &'static str) -> Self {
        Self {
            field,
            _t: PhantomData,
        }
    }
}

impl<T> Clone for Exact<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Exact<T> {}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for Exact<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        let bytes = d.deserialize_seq(ExactBytes {
            field: self.field,
            len: std::mem::size_of::<T>(),
        })?;
        // The length is exact, so kvm-bindings' deserializer copies the
        // bytes as they are.
        T::deserialize(BytesDeserializer::<D::Error>::new(&bytes))
    }
}

struct ExactBytes {
    field: &'static str,
    len: usize,
}

impl ExactBytes {
    fn check<E: de::Error>(&self, got: usize) -> Result<(), E> {
        if got == self.len {
            Ok(())
        } else {
            Err(E::custom(format!(
                "{}: {got} bytes, exactly {} expected",
                self.field, self.len
            )))
        }
    }
}

impl<'de> Visitor<'de> for ExactBytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: an array of exactly {} bytes", self.field, self.len)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(self.len);
        while let Some(b) = seq.next_element::<u8>()? {
            if out.len() == self.len {
                return Err(de::Error::custom(format!(
                    "{}: more than {} bytes, exactly {} expected",
                    self.field, self.len, self.len
                )));
            }
            out.push(b);
        }
        self.check(out.len())?;
        Ok(out)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        self.check(v.len())?;
        Ok(v.to_vec())
    }
}

/// A list of `min..=max` elements, each read with the seed `elem`.
#[derive(Clone, Copy)]
pub struct List<E> {
    field: &'static str,
    min: usize,
    max: usize,
    elem: E,
}

impl<E> List<E> {
    pub const fn new(field: &'static str, min: usize, max: usize, elem: E) -> Self {
        Self {
            field,
            min,
            max,
            elem,
        }
    }
}

impl<T> List<PhantomData<T>> {
    /// A list of plain `T`s (no per-element check beyond `T`'s own).
    pub const fn of(field: &'static str, min: usize, max: usize) -> Self {
        Self::new(field, min, max, PhantomData)
    }
}

impl<'de, E: DeserializeSeed<'de> + Copy> DeserializeSeed<'de> for List<E> {
    type Value = Vec<E::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, E: DeserializeSeed<'de> + Copy> Visitor<'de> for List<E> {
    type Value = Vec<E::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: a list of {} to {} entries",
            self.field, self.min, self.max
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Never trust a size hint beyond the limit; grow as elements come.
        let hint = seq.size_hint().unwrap_or(0).min(self.max).min(1024);
        let mut out = Vec::with_capacity(hint);
        while let Some(v) = seq.next_element_seed(self.elem)? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "{}: more than {} entries",
                    self.field, self.max
                )));
            }
            out.push(v);
        }
        if out.len() < self.min {
            return Err(de::Error::custom(format!(
                "{}: {} entries, at least {} expected",
                self.field,
                out.len(),
                self.min
            )));
        }
        Ok(out)
    }
}

/// `null` or what the seed `S` reads.
#[derive(Clone, Copy)]
pub struct Opt<S>(pub S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Opt<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Opt<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or a value")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

/// `deserialize_with` helper for a field that may be `null` but must be
/// present (serde's default treats a missing `Option` field as `None`).
pub fn required<'de, D: Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    <Option<T> as serde::Deserialize>::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    fn regs(json: &str) -> Result<kvm_regs, serde_json::Error> {
        Exact::<kvm_regs>::new("regs").deserialize(&mut serde_json::Deserializer::from_str(json))
    }

    fn bytes(n: usize) -> String {
        let v: Vec<String> = (0..n).map(|i| (i % 251).to_string()).collect();
        format!("[{}]", v.join(","))
    }

    #[test]
    fn exact_takes_the_right_size_and_refuses_others() {
        let n = std::mem::size_of::<kvm_regs>();
        let r = regs(&bytes(n)).unwrap();
        let back = serde_json::to_string(&r).unwrap();
        assert_eq!(back.replace(' ', ""), bytes(n));
        for bad in [0, 1, n - 1, n + 1, 10 * n] {
            let e = regs(&bytes(bad)).unwrap_err().to_string();
            assert!(e.contains("regs:"), "{bad}: {e}");
            assert!(e.contains(&format!("exactly {n}")), "{bad}: {e}");
        }
        assert!(regs("\"abc\"").unwrap_err().to_string().contains("regs"));
    }

    #[test]
    fn list_bounds_are_enforced() {
        let seed = List::<PhantomData<u32>>::of("msrs", 1, 3);
        let de = |s: &str| seed.deserialize(&mut serde_json::Deserializer::from_str(s));
        assert_eq!(de("[1,2,3]").unwrap(), vec![1, 2, 3]);
        let e = de("[1,2,3,4]").unwrap_err().to_string();
        assert!(e.contains("msrs: more than 3 entries"), "{e}");
        let e = de("[]").unwrap_err().to_string();
        assert!(e.contains("msrs: 0 entries, at least 1"), "{e}");
    }

    #[test]
    fn opt_reads_null_or_the_value() {
        let seed = Opt(List::<PhantomData<u8>>::of("xsave", 2, 2));
        let de = |s: &str| seed.deserialize(&mut serde_json::Deserializer::from_str(s));
        assert_eq!(de("null").unwrap(), None);
        assert_eq!(de("[1,2]").unwrap(), Some(vec![1, 2]));
        assert!(de("[1]").unwrap_err().to_string().contains("xsave"));
    }
}
