/* The Xen 4.17 toolstack headers mayfly-xen-sys binds (Debian 12's libxen-dev). */
#include <xentoollog.h>
#include <xenctrl.h>
#include <xenguest.h>
#include <xengnttab.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
