//! Typed keys: a connection's and a session's place in their core's tables. Both are slab indexes, so
//! mixing them up would compile as `usize` and fail at run time; as distinct types it does not compile.

use std::marker::PhantomData;

use slab::Slab;

/// A connection of one core (its key in that core's connection table). Keys are reused once a
/// connection is gone: a key held across a close is checked against the connection's control block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(usize);

/// A session of one core (its key in that core's session table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey(usize);

/// A key of a [`Table`].
pub trait Key: Copy {
    fn from_index(i: usize) -> Self;
    fn index(self) -> usize;
}

impl Key for ConnKey {
    fn from_index(i: usize) -> Self {
        ConnKey(i)
    }
    fn index(self) -> usize {
        self.0
    }
}

impl Key for SessionKey {
    fn from_index(i: usize) -> Self {
        SessionKey(i)
    }
    fn index(self) -> usize {
        self.0
    }
}

/// A slab addressed by one kind of key only.
pub struct Table<K, T> {
    slab: Slab<T>,
    key: PhantomData<K>,
}

impl<K: Key, T> Default for Table<K, T> {
    fn default() -> Self {
        Table { slab: Slab::new(), key: PhantomData }
    }
}

impl<K: Key, T> Table<K, T> {
    pub fn insert(&mut self, value: T) -> K {
        K::from_index(self.slab.insert(value))
    }

    pub fn get(&self, key: K) -> Option<&T> {
        self.slab.get(key.index())
    }

    pub fn get_mut(&mut self, key: K) -> Option<&mut T> {
        self.slab.get_mut(key.index())
    }

    pub fn contains(&self, key: K) -> bool {
        self.slab.contains(key.index())
    }

    /// Removes the entry; `None` if there was none.
    pub fn remove(&mut self, key: K) -> Option<T> {
        self.slab.try_remove(key.index())
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, &T)> {
        self.slab.iter().map(|(i, v)| (K::from_index(i), v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (K, &mut T)> {
        self.slab.iter_mut().map(|(i, v)| (K::from_index(i), v))
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn clear(&mut self) {
        self.slab.clear();
    }

    pub fn shrink_to_fit(&mut self) {
        self.slab.shrink_to_fit();
    }
}
