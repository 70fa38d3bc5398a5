//! `wasi:keyvalue` (0.2.0-draft: store, atomics, batch) over the node's store. The crate
//! `wasmtime-wasi-keyvalue` only keeps an in-memory map per instance, so the bindings are
//! generated here with async imports and backed by [`outpost_state::Store`]: a guest's
//! writes are durable, replicated to the fleet like every KV write (last writer wins), and
//! visible on the admin state API under the function's namespace.

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::host::{FnShared, FnState};

wasmtime::component::bindgen!({
    path: "wit/keyvalue",
    world: "wasi:keyvalue/imports",
    imports: { default: async | trappable },
    with: { "wasi:keyvalue/store.bucket": Bucket },
    trappable_error_type: { "wasi:keyvalue/store.error" => KvError },
});

use self::wasi::keyvalue::{atomics, batch, store};

/// A guest's open bucket; the namespace comes from the function's settings.
pub struct Bucket;

/// A keyvalue failure: the guest gets `no-such-store` or `other(message)`, a host fault traps.
pub enum KvError {
    NoSuchStore,
    Other(String),
    Trap(wasmtime::Error),
}

impl From<wasmtime::component::ResourceTableError> for KvError {
    fn from(e: wasmtime::component::ResourceTableError) -> Self {
        KvError::Trap(e.into())
    }
}

impl From<outpost_state::StoreError> for KvError {
    fn from(e: outpost_state::StoreError) -> Self {
        KvError::Other(e.to_string())
    }
}

/// Keys listed per page of `list-keys`.
const PAGE: usize = 1000;

pub struct KvView<'a> {
    table: &'a mut ResourceTable,
    shared: &'a FnShared,
}

pub struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

impl FnShared {
    fn kv_value(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.store.kv_get(&self.kv_namespace, key)?.map(|e| e.value))
    }

    async fn kv_set(&self, key: &str, value: Vec<u8>) -> Result<(), KvError> {
        self.store
            .kv_put(&self.kv_namespace, key, value, None, None)
            .await?;
        Ok(())
    }

    async fn kv_remove(&self, key: &str) -> Result<(), KvError> {
        self.store.kv_delete(&self.kv_namespace, key).await?;
        Ok(())
    }
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        if !(identifier.is_empty() || identifier == "default") {
            return Err(KvError::NoSuchStore);
        }
        Ok(self.table.push(Bucket)?)
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<store::Error> {
        match err {
            KvError::NoSuchStore => Ok(store::Error::NoSuchStore),
            KvError::Other(s) => Ok(store::Error::Other(s)),
            KvError::Trap(e) => Err(e),
        }
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(&mut self, _b: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, KvError> {
        self.shared.kv_value(&key)
    }

    async fn set(
        &mut self,
        _b: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        {
            let shared = self.shared;
            shared.kv_set(&key, value).await
        }
    }

    async fn delete(&mut self, _b: Resource<Bucket>, key: String) -> Result<(), KvError> {
        {
            let shared = self.shared;
            shared.kv_remove(&key).await
        }
    }

    async fn exists(&mut self, _b: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        Ok(self.shared.kv_value(&key)?.is_some())
    }

    async fn list_keys(
        &mut self,
        _b: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        // The cursor is an offset: the draft interface gives us no room for a key.
        let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let listed = self.shared.store.kv_list(
            &self.shared.kv_namespace,
            "",
            None,
            skip.saturating_add(PAGE + 1),
        )?;
        let more = listed.len() > skip.saturating_add(PAGE);
        let keys: Vec<String> = listed
            .into_iter()
            .skip(skip)
            .take(PAGE)
            .map(|l| l.key)
            .collect();
        let next = more.then(|| (skip + keys.len()) as u64);
        Ok(store::KeyResponse { keys, cursor: next })
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        _b: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        // Atomic on this node (read and write in the store's writer transaction, sharing its
        // fsync with concurrent writes); across a fleet the key is last-writer-wins like any KV
        // write (use the state API's counters for fleet-wide sums).
        Ok(self
            .shared
            .store
            .kv_increment(&self.shared.kv_namespace, &key, delta)
            .await?)
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        _b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let v = self.shared.kv_value(&k)?;
            out.push(v.map(|v| (k, v)));
        }
        Ok(out)
    }

    async fn set_many(
        &mut self,
        _b: Resource<Bucket>,
        kvs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        let shared = self.shared;
        for (k, v) in kvs {
            shared.kv_set(&k, v).await?;
        }
        Ok(())
    }

    async fn delete_many(
        &mut self,
        _b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        let shared = self.shared;
        for k in keys {
            shared.kv_remove(&k).await?;
        }
        Ok(())
    }
}

pub(crate) fn add_to_linker(l: &mut Linker<FnState>) -> wasmtime::Result<()> {
    fn view(s: &mut FnState) -> KvView<'_> {
        KvView {
            table: &mut s.table,
            shared: &s.shared,
        }
    }
    store::add_to_linker::<FnState, HasKv>(l, view)?;
    atomics::add_to_linker::<FnState, HasKv>(l, view)?;
    batch::add_to_linker::<FnState, HasKv>(l, view)?;
    Ok(())
}
