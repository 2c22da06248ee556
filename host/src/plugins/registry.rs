//! Every loaded plugin version, by name; `name@req` lookup; atomic swap and unload.
//!
//! Lookups hand out `Arc<LoadedPlugin>`: a step keeps the version it started with even if that
//! version is swapped out or unloaded while it runs (make-before-break: the new version is fully
//! loaded before the swap, and the old one lives until its last step drops the `Arc`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use semver::{Version, VersionReq};

use super::loader::LoadedPlugin;
use super::{PluginError, Result};

/// A reference to a plugin by name and version requirement: `debate`, `debate@^0.1`,
/// `echo@=0.2.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRequest {
    /// The plugin name.
    pub name: String,
    /// The acceptable versions (`*` when none was given).
    pub req: VersionReq,
}

impl PluginRequest {
    /// Parse `name` or `name@req`.
    ///
    /// # Errors
    ///
    /// [`PluginError::BadReference`] when the name is empty or the requirement is not semver.
    pub fn parse(reference: &str) -> Result<PluginRequest> {
        let bad = |reason: String| PluginError::BadReference {
            reference: reference.to_string(),
            reason,
        };
        let (name, req) = match reference.split_once('@') {
            Some((name, req)) => (
                name,
                VersionReq::parse(req).map_err(|e| bad(format!("bad version requirement: {e}")))?,
            ),
            None => (reference, VersionReq::STAR),
        };
        if name.is_empty() {
            return Err(bad("the plugin name is empty".into()));
        }
        Ok(PluginRequest {
            name: name.to_string(),
            req,
        })
    }
}

impl std::str::FromStr for PluginRequest {
    type Err = PluginError;

    fn from_str(s: &str) -> Result<Self> {
        PluginRequest::parse(s)
    }
}

impl std::fmt::Display for PluginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.req)
    }
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, BTreeMap<Version, Arc<LoadedPlugin>>>,
    /// Which version each file provides.
    by_path: HashMap<PathBuf, (String, Version)>,
}

/// The loaded plugins.
#[derive(Default)]
pub struct PluginRegistry {
    inner: RwLock<Inner>,
}

impl PluginRegistry {
    /// An empty registry.
    pub fn new() -> PluginRegistry {
        PluginRegistry::default()
    }

    /// Install `plugin` atomically. It replaces the version its file provided before (if any),
    /// and a plugin with the same name and version whose file is gone (a rename). Returns the
    /// versions taken out of service; steps running on them finish undisturbed.
    ///
    /// # Errors
    ///
    /// [`PluginError::Duplicate`] when another file that is still there provides the same
    /// name and version: the version serving keeps serving.
    pub fn swap(&self, plugin: Arc<LoadedPlugin>) -> Result<Vec<Arc<LoadedPlugin>>> {
        let mut inner = self.inner.write().unwrap();
        let mut removed = Vec::new();
        let key = (plugin.info.name.clone(), plugin.version.clone());
        if let Some(holder) = inner.by_name.get(&key.0).and_then(|v| v.get(&key.1))
            && holder.path != plugin.path
            && holder.path.exists()
        {
            return Err(PluginError::Duplicate {
                path: plugin.path.clone(),
                id: plugin.id(),
                other: holder.path.clone(),
            });
        }
        if let Some(old_key) = inner.by_path.get(&plugin.path).cloned()
            && old_key != key
            && let Some(old) = remove_if_from(&mut inner, &old_key, &plugin.path)
        {
            removed.push(old);
        }
        let versions = inner.by_name.entry(key.0.clone()).or_default();
        if let Some(old) = versions.insert(key.1.clone(), plugin.clone()) {
            if old.path != plugin.path {
                inner.by_path.remove(&old.path);
            }
            removed.push(old);
        }
        inner.by_path.insert(plugin.path.clone(), key);
        Ok(removed)
    }

    /// Take the version loaded from `path` out of service. Returns it, if there was one;
    /// steps running on it finish undisturbed.
    pub fn unload(&self, path: &Path) -> Option<Arc<LoadedPlugin>> {
        let mut inner = self.inner.write().unwrap();
        let key = inner.by_path.remove(path)?;
        remove_if_from(&mut inner, &key, path)
    }

    /// The highest loaded version matching `request`.
    ///
    /// # Errors
    ///
    /// [`PluginError::NotFound`] or [`PluginError::NoMatchingVersion`] (listing what is loaded).
    pub fn resolve(&self, request: &PluginRequest) -> Result<Arc<LoadedPlugin>> {
        let inner = self.inner.read().unwrap();
        let versions = inner
            .by_name
            .get(&request.name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| PluginError::NotFound {
                name: request.name.clone(),
            })?;
        versions
            .iter()
            .rev()
            .find(|(v, _)| request.req.matches(v))
            .map(|(_, p)| p.clone())
            .ok_or_else(|| PluginError::NoMatchingVersion {
                name: request.name.clone(),
                req: request.req.to_string(),
                loaded: versions
                    .keys()
                    .map(Version::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// [`PluginRegistry::resolve`] for a reference like `debate@^0.1`.
    ///
    /// # Errors
    ///
    /// As [`PluginRequest::parse`] and [`PluginRegistry::resolve`].
    pub fn resolve_str(&self, reference: &str) -> Result<Arc<LoadedPlugin>> {
        self.resolve(&PluginRequest::parse(reference)?)
    }

    /// The version loaded from `path`, if any.
    pub fn by_path(&self, path: &Path) -> Option<Arc<LoadedPlugin>> {
        let inner = self.inner.read().unwrap();
        let (name, version) = inner.by_path.get(path)?;
        inner.by_name.get(name)?.get(version).cloned()
    }

    /// Every loaded version, by name then version.
    pub fn list(&self) -> Vec<Arc<LoadedPlugin>> {
        let inner = self.inner.read().unwrap();
        inner
            .by_name
            .values()
            .flat_map(|versions| versions.values().cloned())
            .collect()
    }
}

fn remove_if_from(
    inner: &mut Inner,
    (name, version): &(String, Version),
    path: &Path,
) -> Option<Arc<LoadedPlugin>> {
    let versions = inner.by_name.get_mut(name)?;
    if versions.get(version)?.path != path {
        return None;
    }
    let removed = versions.remove(version);
    if versions.is_empty() {
        inner.by_name.remove(name);
    }
    removed
}
