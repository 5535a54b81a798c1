plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "ai.phi3export.sample"
    compileSdk = 34

    defaultConfig {
        applicationId = "ai.phi3export.sample"
        minSdk = 28
        targetSdk = 34
        versionCode = 1
        versionName = "1.0"
        ndk { abiFilters += listOf("arm64-v8a") }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    // The model is read from a file path by native code: never compress or bundle it into the APK.
    androidResources { noCompress += listOf("onnx", "data") }
}

dependencies {
    // onnxruntime-genai's Android AAR, from its GitHub release (the version phi3-export pins: 0.18.0),
    // placed in app/libs/. It needs onnxruntime-android beside it.
    implementation(files("libs/onnxruntime-genai-android-0.18.0.aar"))
    implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.8.1")
}
