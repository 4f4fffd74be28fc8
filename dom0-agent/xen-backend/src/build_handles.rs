//! libxenctrl handles of their own for the in-process builds of the Mayfly PV guest.
//!
//! A [`Control`] serialises its calls on one handle, and `PvBuilder::build` holds that
//! handle for the whole build (tens of ms under emulation). Built on the backend's shared
//! handle, every hand-out's unpause, every destroy, every liveness check of the serving
//! threads and a second build thread would queue behind a build in progress. So each build
//! borrows a handle from this list (opening one if none is free) and gives it back after:
//! at most one handle per concurrent build, i.e. per refill thread.

use std::sync::{Arc, Mutex};

use mayfly_sync::lock;
use mayfly_xen::{Control, CtrlError, Libraries};

/// The free handles.
pub(crate) struct BuildHandles {
    libs: Arc<Libraries>,
    free: Mutex<Vec<Control>>,
}

impl BuildHandles {
    /// No handle yet: the first build opens one.
    pub(crate) fn new(libs: Arc<Libraries>) -> Self {
        Self {
            libs,
            free: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a handle no other thread uses meanwhile: a free one, or a new one if
    /// none is free (an error if it cannot be opened). The handle is kept for the next
    /// build.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Control) -> R) -> Result<R, CtrlError> {
        let free = lock(&self.free).pop();
        let control = match free {
            Some(control) => control,
            None => Control::open(Arc::clone(&self.libs))?,
        };
        let result = f(&control);
        lock(&self.free).push(control);
        Ok(result)
    }
}
