//! Values as executors take and give them: the interpreter, the native code and the runtime.

/// A value: f32 or i32 elements in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub enum Buf {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl Buf {
    pub fn f32(&self) -> &[f32] {
        match self {
            Buf::F32(v) => v,
            Buf::I32(_) => &[],
        }
    }

    pub fn i32(&self) -> &[i32] {
        match self {
            Buf::I32(v) => v,
            Buf::F32(_) => &[],
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
