#pragma once
#include "kemu_half.h"
