#pragma once
#include "../kemu_wmma.h"
