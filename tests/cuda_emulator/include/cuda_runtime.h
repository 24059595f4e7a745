// Stands in for the CUDA header of this name under the emulator (see emu_shim.h).
#pragma once
#include "emu_shim.h"
