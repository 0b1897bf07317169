// Stub for the CPU emulation of the kernels (tests only): see ../emu.h.
#pragma once
#include "../emu.h"
