//! The one process-wide `wasmtime::Engine`, its epoch ticker and the linker of host services.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::StepHandler;
use super::host_impl::StepState;
use super::{PluginError, Result};

/// Engine-wide settings (fixed when the engine is created).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Largest wasm stack of a step, in bytes; deeper recursion traps with a stack overflow.
    pub max_wasm_stack: usize,
    /// How often the epoch advances: the granularity of CPU-time limits.
    #[serde(with = "humantime_ms")]
    pub epoch_tick: Duration,
    /// Try the pooling allocator (fast instantiation); on-demand allocation when it fails.
    pub pooling: bool,
    /// Concurrent instances the pool holds (steps running at once, plus `describe` calls).
    pub pool_instances: u32,
    /// Largest linear memory the pool can hold; per-plugin memory limits above it are capped.
    pub pool_max_memory_bytes: usize,
    /// Largest table the pool can hold, in elements; per-plugin table limits above it are
    /// capped. The default is the default table limit of a step, so the pool never refuses a
    /// table the limits allow.
    pub pool_max_table_elements: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_wasm_stack: 1 << 20,
            epoch_tick: Duration::from_millis(5),
            pooling: true,
            pool_instances: 128,
            pool_max_memory_bytes: 512 << 20,
            pool_max_table_elements: super::limits::StepLimits::default().table_elements,
        }
    }
}

/// Which instance allocator the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllocatorKind {
    /// Pre-reserved slots: instantiation in microseconds.
    Pooling,
    /// `mmap` per instance: slower, works everywhere.
    OnDemand,
}

/// The process-wide engine, the linker with every host service, and the epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<StepState>,
    allocator: AllocatorKind,
    config: EngineConfig,
    ticker: EpochTicker,
    /// Set by [`PluginEngine::interrupt_all`]: every running guest stops at its next host call
    /// or epoch check, and no new one starts.
    shutdown: Arc<AtomicBool>,
}

impl PluginEngine {
    /// Create the engine: component model, epoch interruption, the pooling allocator when the
    /// machine allows it (logged either way), WASI p2 and the `ksi:plugin` imports.
    ///
    /// # Errors
    ///
    /// [`PluginError::Engine`] when neither allocator can be set up.
    pub fn new(config: EngineConfig) -> Result<Arc<PluginEngine>> {
        let (engine, allocator) = match config.pooling {
            true => match Engine::new(&wasm_config(&config, true)) {
                Ok(engine) => (engine, AllocatorKind::Pooling),
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                    (on_demand(&config)?, AllocatorKind::OnDemand)
                }
            },
            false => (on_demand(&config)?, AllocatorKind::OnDemand),
        };
        tracing::info!(?allocator, "plugin engine ready");
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| PluginError::Engine(format!("cannot link WASI: {e}")))?;
        StepHandler::add_to_linker::<StepState, HasSelf<StepState>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("cannot link host services: {e}")))?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(Arc::new(PluginEngine {
            engine,
            linker,
            allocator,
            config,
            ticker,
            shutdown: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The linker holding WASI and the `ksi:plugin` host services.
    pub(crate) fn linker(&self) -> &Linker<StepState> {
        &self.linker
    }

    /// Which allocator is in use.
    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    /// The settings the engine was created with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Stop every running guest wherever it is (in wasm, at its next epoch check; in a host
    /// call, when the call returns) and refuse new ones: the daemon is shutting down.
    pub fn interrupt_all(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.engine.increment_epoch();
    }

    /// Whether [`PluginEngine::interrupt_all`] was called.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub(crate) fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Epoch ticks covering `d` (at least one).
    pub(crate) fn ticks(&self, d: Duration) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        (d.as_nanos().div_ceil(tick) as u64).max(1)
    }

    /// Mark guest code as running until the guard drops: the ticker sleeps while nothing runs,
    /// so an idle daemon does not wake up every tick.
    pub(crate) fn running(&self) -> RunningGuard<'_> {
        self.ticker.shared.active.fetch_add(1, Ordering::SeqCst);
        self.ticker.thread.thread().unpark();
        RunningGuard(&self.ticker.shared)
    }
}

fn on_demand(config: &EngineConfig) -> Result<Engine> {
    Engine::new(&wasm_config(config, false)).map_err(|e| PluginError::Engine(e.to_string()))
}

fn wasm_config(config: &EngineConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        // One thread compiles: a plugin compiles once per content (then its machine code is
        // cached), and Cranelift's parallel working memory stayed in the daemon's heap after
        // start-up (`ksi-host bench api`: idle RSS 40.8 -> 37.7 MB, with malloc_trim).
        .parallel_compilation(false);
    if pooling {
        let n = config.pool_instances;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 4)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(16)
            .max_memory_size(config.pool_max_memory_bytes)
            .table_elements(config.pool_max_table_elements)
            .total_stacks(0)
            // Reset a reused slot with memset instead of madvise + page faults: a step touches
            // little memory (stack and a small heap at the bottom), so this is the fast path.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(Enabled::Auto);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

struct TickerShared {
    active: AtomicUsize,
    stop: AtomicBool,
}

/// Advances the engine's epoch every tick while some guest code runs.
struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: JoinHandle<()>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> EpochTicker {
        let shared = Arc::new(TickerShared {
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ksi-epoch-ticker".into())
            .spawn(move || {
                while !s.stop.load(Ordering::SeqCst) {
                    if s.active.load(Ordering::SeqCst) == 0 {
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("cannot spawn the epoch ticker thread");
        EpochTicker { shared, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
    }
}

/// See [`PluginEngine::running`].
pub(crate) struct RunningGuard<'a>(&'a TickerShared);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

mod humantime_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
