#pragma once
#include "kemu_device.h"
#include "kemu_half.h"
