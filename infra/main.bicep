// SendGrid segment connector: Azure Functions (Flex Consumption, Python 3.11) + Storage + Key Vault + monitoring.
// Modelled on Azure-Samples/functions-quickstart-python-azd-eventgrid-blob, with plain resource declarations instead of
// registry modules (nothing to download at build time). `azd up` provisions this, deploys the code, then runs
// infra/hooks/postdeploy.sh (.ps1 on Windows), which subscribes the blob trigger to the storage account's events.
// docs/deploy.md walks through it.

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; it seeds a unique token in every resource name.')
param environmentName string

@minLength(1)
@description('Region for every resource. It must offer the Flex Consumption plan.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('Object id of whoever runs the deployment (azd sets AZURE_PRINCIPAL_ID): gets Key Vault Secrets Officer and Storage Blob Data Contributor so the post-deploy steps work. Empty: no roles.')
param principalId string = ''

@allowed(['User', 'ServicePrincipal', 'Group'])
param principalType string = 'User'

@description('Object id of the "Dynamics 365 AI for Customer Insights" service principal in this tenant: gets Storage Blob Data Contributor on the exports container. Empty: grant it later (docs/deploy.md).')
param customerInsightsPrincipalId string = ''

@description('NCRONTAB schedule (6 fields, UTC) of the refresh timer; empty: every 5 minutes (destinations with a schedule of their own run at the first tick after it is due).')
param refreshSchedule string = ''

// host.json has "functionTimeout": "00:30:00" (1,800 s). A run stops cleanly (status "interrupted", resumable by the
// timer) this many seconds after it starts: the timeout minus a 5-minute margin for the final checkpoint and report.
// tests/test_infra.py checks the two agree.
@minValue(60)
@maxValue(1740)
param runDeadlineSeconds int = 1500

param exportsContainerName string = 'exports'
param stateContainerName string = 'sendgrid-connector-state'
param runsQueueName string = 'sendgrid-runs'

@description('Blob container where Event Grid puts the BlobCreated events it could not deliver to the app.')
param deadLetterContainerName string = 'eventgrid-deadletter'

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

param keyVaultPurgeProtection bool = false

@description('Email address that alerts go to (azd env set ALERT_EMAIL ...); empty: the alert rules exist but mail no one.')
param alertEmail string = ''

@description('A finished run alerts when it rejected more than this percentage of the rows it read.')
@minValue(1)
@maxValue(100)
param alertRejectedPercent int = 10

@description('A destination that should run alerts after this many hours without a successful run: twice the export schedule (Customer Insights refreshes daily; at most 48, the longest look-back of an Azure log alert).')
@minValue(1)
@maxValue(48)
param alertStaleAfterHours int = 48

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName }
var serviceName = 'connector' // azure.yaml services.connector
var functionAppName = 'func-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var schedule = empty(refreshSchedule) ? '0 */5 * * * *' : refreshSchedule

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'core/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'core/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    containerNames: [deploymentContainerName, exportsContainerName, stateContainerName, deadLetterContainerName]
    queueNames: [runsQueueName]
  }
}

module monitoring 'core/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module keyVault 'core/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    enablePurgeProtection: keyVaultPurgeProtection
  }
}

module exportsTopic 'core/eventgrid.bicep' = {
  name: 'eventgrid'
  scope: rg
  params: {
    name: 'evgt-${resourceToken}'
    location: location
    tags: tags
    storageAccountId: storage.outputs.id
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    exportsContainerName: exportsContainerName
    deadLetterContainerName: deadLetterContainerName
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    identityPrincipalId: identity.outputs.principalId
    principalId: principalId
    principalType: principalType
    customerInsightsPrincipalId: customerInsightsPrincipalId
    eventGridPrincipalId: exportsTopic.outputs.principalId
  }
}

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    namePrefix: 'sgc-${resourceToken}'
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    systemTopicId: exportsTopic.outputs.id
    alertEmail: alertEmail
    rejectedPercentThreshold: alertRejectedPercent
    staleAfterHours: alertStaleAfterHours
  }
}

// Every setting the app reads. Optional ones left out are listed in docs/deploy.md ("Optional settings").
var appSettings = {
  // Functions host storage, identity-based (no keys exist: shared-key access is off).
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.outputs.clientId
  AzureWebJobsStorage__blobServiceUri: storage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: storage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: storage.outputs.tableEndpoint // the host's diagnostic events
  // Telemetry, authenticated with the identity (Application Insights local auth is off).
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'
  // Connection "ExportsStorage": the blob trigger, the BlobClient binding, the runs queue, the state container.
  ExportsStorage__credential: 'managedidentity'
  ExportsStorage__clientId: identity.outputs.clientId
  ExportsStorage__blobServiceUri: storage.outputs.blobEndpoint
  ExportsStorage__queueServiceUri: storage.outputs.queueEndpoint
  // The connector (shared/context.py, shared/secrets.py).
  EXPORTS_CONTAINER: exportsContainerName
  STATE_CONTAINER: stateContainerName
  DESTINATIONS_CONFIG: 'blob:destinations.json'
  REFRESH_SCHEDULE: schedule
  RUN_DEADLINE_SECONDS: string(runDeadlineSeconds)
  RUNS_QUEUE: runsQueueName
  KEY_VAULT_URL: keyVault.outputs.uri
  KEY_VAULT_SECRET_TTL_SECONDS: '300'
  AZURE_CLIENT_ID: identity.outputs.clientId // DefaultAzureCredential: use the user-assigned identity
  AZURE_TOKEN_CREDENTIALS: 'prod' // DefaultAzureCredential: skip developer-tool credentials in Azure
}

module functionApp 'core/flex-function.bicep' = {
  name: 'function'
  scope: rg
  dependsOn: [rbac] // roles first: the host reads its storage with the identity as soon as it starts
  params: {
    planName: 'plan-${resourceToken}'
    appName: functionAppName
    location: location
    tags: tags
    serviceName: serviceName
    identityId: identity.outputs.id
    storageBlobEndpoint: storage.outputs.blobEndpoint
    deploymentContainerName: deploymentContainerName
    runtimeVersion: '3.11'
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    appSettings: appSettings
  }
}

// Outputs become azd environment values (`azd env get-values`); the post-deploy hook reads them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_HOSTNAME string = functionApp.outputs.defaultHostName
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_KEY_VAULT_ENDPOINT string = keyVault.outputs.uri
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output EXPORTS_CONTAINER_NAME string = exportsContainerName
output STATE_CONTAINER_NAME string = stateContainerName
output RUNS_QUEUE_NAME string = runsQueueName
output EXPORTS_SYSTEM_TOPIC_NAME string = exportsTopic.outputs.name
output EXPORTS_SYSTEM_TOPIC_ID string = exportsTopic.outputs.id
output AZURE_STORAGE_ACCOUNT_ID string = storage.outputs.id
output EVENTGRID_DEADLETTER_CONTAINER_NAME string = deadLetterContainerName
